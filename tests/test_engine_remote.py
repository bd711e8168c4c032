"""Remote inputs and outputs: s3:// against moto's server over HTTP, hf:// against a local hub over HTTP.
Results must be byte-identical to a local run, read with ranged requests, and failures must leave nothing."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import upload_dir
from graft_helpers import graft, load_dir, read_json
from hub_server import HubServer

from worker.devtools.sample_models import LlamaShape, make_trio
from worker.engine import GraftCancelled, GraftError
from worker.engine.storage.model import HEADER_PROBE
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.stores import S3Store

SKIP_COMPARE = {"graft-manifest.json", "README.md"}  # these name the input URIs


def _s3_listing(client, bucket: str, prefix: str) -> tuple[list[str], list[dict]]:
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/").get("Uploads", [])
    return objects, uploads


def _compare_with_local(local_out, fetch) -> None:
    names = sorted(set(os.listdir(local_out)) - SKIP_COMPARE)
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        with open(os.path.join(local_out, name), "rb") as fh:
            assert fetch(name) == fh.read(), name


class _GetObjectRanges:
    """Observes the GetObject calls the engine's (shared) boto3 client makes; does not change them."""

    def __init__(self, client) -> None:
        self.client, self.calls = client, []

    def __enter__(self):
        self.client.meta.events.register("provide-client-params.s3.GetObject", self._record)
        return self

    def _record(self, params, **kwargs) -> None:
        self.calls.append((params.get("Key"), params.get("Range")))

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister("provide-client-params.s3.GetObject", self._record)


def test_s3_inputs_and_output_match_local_run(trio, tmp_path, s3_endpoint, s3_bucket):
    graft(trio, tmp_path / "local", shard_size="100KB")
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"models/{role}") for role, path in trio.items()}
    client = s3_client(s3_endpoint)
    # S3Store.client_for: the client inputs are read with (its read timeout is the stall limit)
    with _GetObjectRanges(S3Store.client_for(s3_endpoint)) as seen:  # windows smaller than the shards
        result, _ = graft(uris, f"s3://{s3_bucket}/grafts/one", shard_size="100KB",
                          settings_overrides={"remote_window_bytes": 64 << 10, "remote_span_windows": 1})
    assert result.manifest_uri == f"s3://{s3_bucket}/grafts/one/graft-manifest.json"

    def fetch(name: str) -> bytes:
        return client.get_object(Bucket=s3_bucket, Key=f"grafts/one/{name}")["Body"].read()

    _compare_with_local(str(tmp_path / "local"), fetch)
    objects, uploads = _s3_listing(client, s3_bucket, "grafts/one")
    assert {k.rsplit("/", 1)[1] for k in objects} == set(os.listdir(tmp_path / "local"))
    assert uploads == []
    manifest = json.loads(fetch("graft-manifest.json"))
    assert manifest["inputs"]["source_finetuned"]["uri"] == uris["source_finetuned"]
    assert {f["path"] for f in manifest["output"]["files"]} == set(os.listdir(tmp_path / "local")) - {
        "graft-manifest.json"}
    for record in manifest["output"]["files"]:
        assert hashlib.sha256(fetch(record["path"])).hexdigest() == record["sha256"]
    # every weight read was a ranged GET
    weight_reads = [(k, r) for k, r in seen.calls if k.endswith(".safetensors")]
    assert weight_reads and all(r and r.startswith("bytes=") for _, r in weight_reads)
    assert any(not r.startswith("bytes=0-") for _, r in weight_reads)


def test_failing_graft_to_s3_leaves_nothing(trio, tmp_path, s3_endpoint, s3_bucket):
    from graft_helpers import copy_trio, set_element

    paths = copy_trio(trio, tmp_path / "in")
    name = "model.layers.1.mlp.gate_proj.weight"
    set_element(paths["source_finetuned"], name, (0, 0), float("nan"))
    with pytest.raises(GraftError) as info:
        graft(paths, f"s3://{s3_bucket}/grafts/bad", shard_size="100KB")
    assert info.value.code == "nonfinite_output" and name in info.value.message
    assert _s3_listing(s3_client(s3_endpoint), s3_bucket, "grafts/bad") == ([], [])


@pytest.fixture(scope="module")
def big_trio(tmp_path_factory):
    """One shard of about 11 MB per model: big enough for multipart uploads with 8 MiB parts."""
    shape = LlamaShape(vocab=8192, hidden=320, layers=1, intermediate=64, heads=4, kv_heads=2)
    return make_trio(str(tmp_path_factory.mktemp("big")), shape=shape, added_rows=0, shards=(1, 1, 1),
                     target_only=False)


def test_cancelled_multipart_upload_is_aborted(big_trio, s3_endpoint, s3_bucket):
    client = s3_client(s3_endpoint)
    prefix = "grafts/cancelled"
    seen_upload = []

    def should_cancel() -> bool:
        uploads = client.list_multipart_uploads(Bucket=s3_bucket, Prefix=prefix + "/").get("Uploads", [])
        seen_upload.extend(uploads)
        return bool(uploads)

    with pytest.raises(GraftCancelled):
        graft(big_trio, f"s3://{s3_bucket}/{prefix}", should_cancel=should_cancel,
              settings_overrides={"block_bytes": 512 << 10, "s3_part_bytes": 8 << 20, "prefetch_blocks": 1})
    assert seen_upload, "the cancel came before any multipart upload started"
    assert _s3_listing(client, s3_bucket, prefix) == ([], [])


def test_big_output_to_s3_is_multipart_and_identical(big_trio, tmp_path, s3_endpoint, s3_bucket):
    overrides = {"block_bytes": 1 << 20, "s3_part_bytes": 8 << 20}
    graft(big_trio, tmp_path / "local", settings_overrides=overrides)
    client = s3_client(s3_endpoint)
    trace_file = tmp_path / "trace.json"
    result, _ = graft(big_trio, f"s3://{s3_bucket}/grafts/big",
                      settings_overrides={**overrides, "trace": str(trace_file)})
    head = client.head_object(Bucket=s3_bucket, Key="grafts/big/model.safetensors")
    assert "-" in head["ETag"]  # a multipart object
    # GRAFT_TRACE: every part of the upload, its completion and the job's marks, in order
    events = json.loads(trace_file.read_text())["events"]
    parts = [e for e in events if e["kind"] == "part" and e["key"] == "grafts/big/model.safetensors"]
    assert sum(e["bytes"] for e in parts) == head["ContentLength"]
    assert sorted(e["number"] for e in parts) == list(range(1, len(parts) + 1))
    assert all(e["ready"] <= e["slot"] <= e["t0"] <= e["t1"] for e in parts)
    assert [e["key"] for e in events if e["kind"] == "complete"] == ["grafts/big/model.safetensors"]
    assert [e["what"] for e in events if e["kind"] == "mark"] == ["resolved", "output claimed", "stream start",
                                                                  "stream end", "commit", "end"]
    _compare_with_local(str(tmp_path / "local"),
                        lambda n: client.get_object(Bucket=s3_bucket, Key=f"grafts/big/{n}")["Body"].read())
    assert _s3_listing(client, s3_bucket, "grafts/big")[1] == []


def test_s3_output_refuses_committed_prefix(trio, s3_endpoint, s3_bucket):
    graft(trio, f"s3://{s3_bucket}/grafts/twice")
    with pytest.raises(GraftError) as info:
        graft(trio, f"s3://{s3_bucket}/grafts/twice")
    assert info.value.code == "output_exists"
    objects, _ = _s3_listing(s3_client(s3_endpoint), s3_bucket, "grafts/twice")
    assert any(k.endswith("graft-manifest.json") for k in objects)


def test_s3_output_never_deletes_unrelated_objects(trio, s3_endpoint, s3_bucket):
    """An output prefix that holds someone else's objects (here: an input model) must be refused, not
    emptied: the engine may only clear what an earlier attempt of a graft left there."""
    client = s3_client(s3_endpoint)
    uri = upload_dir(s3_endpoint, trio["source_base"], s3_bucket, "shared/source_base")
    before = sorted(_s3_listing(client, s3_bucket, "shared")[0])
    with pytest.raises(GraftError) as info:
        graft(trio, f"s3://{s3_bucket}/shared")
    assert info.value.code == "output_exists"
    assert sorted(_s3_listing(client, s3_bucket, "shared")[0]) == before
    with pytest.raises(GraftError):
        graft({**trio, "source_base": uri}, f"s3://{s3_bucket}/shared/source_base")
    assert sorted(_s3_listing(client, s3_bucket, "shared")[0]) == before


def test_s3_output_retry_clears_leftovers_of_a_killed_attempt(trio, s3_endpoint, s3_bucket):
    """What a killed attempt left (objects, a pending multipart upload, no manifest) does not stop a retry."""
    from worker.engine.storage.sinks import S3Sink
    from worker.engine.storage.uris import parse_uri

    client = s3_client(s3_endpoint)
    sink = S3Sink(parse_uri(f"s3://{s3_bucket}/grafts/retry"), endpoint_url=s3_endpoint, writer="job-7")
    sink.put("model-00001-of-00002.safetensors", b"partial")
    client.create_multipart_upload(Bucket=s3_bucket, Key="grafts/retry/model-00002-of-00002.safetensors")
    sink.pool.shutdown()  # the attempt dies here: no abort, no commit
    sink._finisher.shutdown()
    before = _s3_listing(client, s3_bucket, "grafts/retry")
    with pytest.raises(GraftError) as info:  # another job must not clear them: that writer may be alive
        graft(trio, f"s3://{s3_bucket}/grafts/retry", writer="job-8")
    assert info.value.code == "output_busy"
    assert _s3_listing(client, s3_bucket, "grafts/retry") == before
    result, _ = graft(trio, f"s3://{s3_bucket}/grafts/retry", writer="job-7")
    objects, uploads = _s3_listing(client, s3_bucket, "grafts/retry")
    assert uploads == []
    assert {k.rsplit("/", 1)[1] for k in objects} == {f["path"] for f in result.manifest["output"]["files"]} | {
        "graft-manifest.json"}


# --- hf:// ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_trio(tmp_path_factory):
    """Shards bigger than the header probe, so a whole-file read would show."""
    shape = LlamaShape(vocab=8192, hidden=128, layers=2, intermediate=128, heads=4, kv_heads=2)
    return make_trio(str(tmp_path_factory.mktemp("hub")), shape=shape, shards=(1, 2, 1))


@pytest.fixture
def hub(hub_trio, monkeypatch):
    server = HubServer()
    for role, path in hub_trio.items():
        server.add(f"graft-test/{role.replace('_', '-')}", path)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield server
    finally:
        server.stop()


def test_hf_inputs_ranged_and_identical_to_local(hub_trio, hub, tmp_path):
    graft(hub_trio, tmp_path / "local", settings_overrides={"block_bytes": 256 << 10})
    uris = {"source_base": "hf://graft-test/source-base", "source_finetuned": "hf://graft-test/source-finetuned@main",
            "target_base": f"hf://graft-test/target-base@{hub.repos['graft-test/target-base'].sha}"}
    result, _ = graft(uris, tmp_path / "remote", settings_overrides={"block_bytes": 256 << 10,
                                                                   "remote_window_bytes": 512 << 10,
                                                                   "remote_span_windows": 2})
    _compare_with_local(str(tmp_path / "local"), lambda n: (tmp_path / "remote" / n).read_bytes())
    local = load_dir(str(tmp_path / "local"))
    assert local.keys() == load_dir(str(tmp_path / "remote")).keys()

    requests = hub.file_requests()
    shard_requests = [r for r in requests if r["file"].endswith(".safetensors")]
    assert shard_requests
    for r in shard_requests:
        assert r["range"] is not None and r["status"] == 206, r  # never a plain GET
        assert r["size"] > HEADER_PROBE and r["bytes"] < r["size"], r  # never a whole shard
    assert all(r["revision"] == hub.repos[r["repo"]].sha for r in requests)  # pinned to the commit
    for role, uri in uris.items():
        repo = hub.repos[uri[len("hf://"):].split("@")[0]]
        entry = result.manifest["inputs"][role]
        assert entry["uri"] == uri and entry["revision"] == repo.sha
        for name, fp in entry["files"].items():
            assert fp["size"] == len(repo.files[name])
            if name.endswith(".safetensors"):
                assert fp["sha256"] == hashlib.sha256(repo.files[name]).hexdigest()
    assert read_json(tmp_path / "remote" / "config.json")["vocab_size"] == 8200


def test_hf_unknown_repo_or_revision(hub_trio, hub, tmp_path):
    for bad in ("hf://graft-test/nope", "hf://graft-test/target-base@0123456789abcdef0123456789abcdef01234567"):
        with pytest.raises(GraftError) as info:
            graft({**hub_trio, "target_base": bad}, tmp_path / "out")
        assert info.value.code == "input_not_found" and bad.split("@")[0] in info.value.message
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("ours", [True, False])
def test_manifest_put_refused_after_it_landed_is_a_success(s3_endpoint, s3_bucket, ours):
    """If the conditional manifest PUT landed but its answer was lost, the retry is refused (412): the
    sink must see its own manifest there and succeed, not abort and delete its own shards."""
    from worker.engine.storage.sinks import MANIFEST, PENDING, S3Sink
    from worker.engine.storage.uris import parse_uri

    client = s3_client(s3_endpoint)
    sink = S3Sink(parse_uri(f"s3://{s3_bucket}/race"), endpoint_url=s3_endpoint)
    sink.put("config.json", b"{}")
    manifest = b'{"format": "graft-manifest/1"}'
    client.put_object(Bucket=s3_bucket, Key=f"race/{MANIFEST}", Body=manifest if ours else b"{}")
    if ours:
        assert sink.commit(manifest) == f"s3://{s3_bucket}/race/{MANIFEST}"
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="race/")["Contents"]}
        assert keys == {"race/config.json", f"race/{MANIFEST}"} and f"race/{PENDING}" not in keys
    else:
        with pytest.raises(GraftError) as err:
            sink.commit(manifest)
        assert err.value.code == "output_exists"
