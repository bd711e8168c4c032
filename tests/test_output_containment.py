"""Issue 13, item 9: no output is placed at or inside a model's directory (config.json, a safetensors index or
*.safetensors directly in it), a published result or an output another job is writing, nor through an existing
file, for file:// and s3:// alike: by POST /v1/jobs, /v1/jobs:preview and /v1/preflights, and again by the
worker when the job runs. On the earlier main a tenant wrote under `s3://models/source_base/<x>` and under
`s3://models/target_base/model.safetensors.index.json/`, and the preview ignored `output` altogether.
Its review: an idempotent replay after the job succeeded got 422 (the placement check ran before the key was
looked up) and called the tenant's own result a model's directory; an output being written (S3's claim, a
local output's staging directory) did not protect its location; shards alone past the first listing page were
missed."""

from __future__ import annotations

import os

import pytest
from service_fixtures import Service, job_body, wait_job

# Where a model lies, relative to the shared bucket or root, and the files it holds.
MODELS = {
    "source_base": ("config.json", "model.safetensors"),
    "target_base": ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"),
    "team/lora": ("adapter_config.json", "adapter_model.safetensors"),  # shards alone make a model too
    "deep/a/b": ("config.json",),
    "loose": ("notes.txt",),  # not a model: a file an output's path must not run through
}
REFUSED = [
    "source_base/x",
    "target_base/model.safetensors.index.json/",
    "target_base/model.safetensors.index.json/x",
    "target_base",
    "source_base/x/y/z/w",
    "team/lora/out",
    "deep/a/b/c/d",
    "loose/notes.txt/out",
]
ACCEPTED = ["fresh/out", "team/out", "source_base-copy/out", "deep/a/c", "loose/out"]


def _s3_layout(endpoint: str, bucket: str) -> None:
    from worker.engine.storage.s3 import s3_client

    client = s3_client(endpoint)
    for where, names in MODELS.items():
        for name in names:
            client.put_object(Bucket=bucket, Key=f"{where}/{name}", Body=b"{}")


def _file_layout(root: str) -> str:
    shared = os.path.join(root, "shared")
    for where, names in MODELS.items():
        os.makedirs(os.path.join(shared, where), exist_ok=True)
        for name in names:
            with open(os.path.join(shared, where, name), "w") as fh:
                fh.write("{}")
    return shared


def _keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    from worker.engine.storage.s3 import s3_client

    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _refused(resp) -> None:
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["errors"][0]["field"] == "output" and body["errors"][0]["type"] == "uri_not_allowed", body


# The policy on its own: every case, both schemes, without a service.

def _settings(root: str, endpoint: str | None = None):
    from worker.service.settings import Settings

    return Settings(allowed_roots=root, s3_endpoint_url=endpoint)


def _check(uri: str, settings, *, itself: bool = True) -> None:
    from worker.service.uri_policy import check_output_placement, check_uri

    loc = check_uri(uri, "output", settings, output=True)
    check_output_placement(loc, "output", settings, **({} if itself else {"itself": False}))


@pytest.mark.parametrize("where", REFUSED)
def test_outputs_in_a_model_are_refused_local(tmp_path, where):
    from worker.service.uri_policy import PolicyError

    shared = _file_layout(str(tmp_path))
    with pytest.raises(PolicyError) as info:
        _check(f"file://{shared}/{where}", _settings(str(tmp_path)))
    assert info.value.code == "uri_not_allowed" and info.value.field == "output"
    assert sorted(os.listdir(shared)) == sorted({w.split("/")[0] for w in MODELS})  # nothing created


@pytest.mark.parametrize("where", REFUSED)
def test_outputs_in_a_model_are_refused_s3(tmp_path, s3_endpoint, s3_bucket, where):
    from worker.service.uri_policy import PolicyError

    _s3_layout(s3_endpoint, s3_bucket)
    with pytest.raises(PolicyError) as info:
        _check(f"s3://{s3_bucket}/{where}", _settings(str(tmp_path), s3_endpoint))
    assert info.value.code == "uri_not_allowed" and info.value.field == "output"


@pytest.mark.parametrize("where", ACCEPTED)
def test_outputs_beside_models_are_accepted(tmp_path, s3_endpoint, s3_bucket, where):
    shared = _file_layout(str(tmp_path))
    _s3_layout(s3_endpoint, s3_bucket)
    _check(f"file://{shared}/{where}", _settings(str(tmp_path)))
    _check(f"s3://{s3_bucket}/{where}", _settings(str(tmp_path), s3_endpoint))


def test_a_model_at_the_bucket_root_or_the_allowed_root_covers_everything_in_it(tmp_path, s3_endpoint, s3_bucket):
    from worker.engine.storage.s3 import s3_client
    from worker.service.uri_policy import PolicyError

    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key="config.json", Body=b"{}")
    (tmp_path / "config.json").write_text("{}")
    for uri in (f"s3://{s3_bucket}/any/where", f"file://{tmp_path}/any/where"):
        with pytest.raises(PolicyError):
            _check(uri, _settings(str(tmp_path), s3_endpoint))


def test_a_config_above_the_allowed_root_is_the_operators_and_not_looked_at(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # e.g. an application's config beside the data directory
    (tmp_path / "data").mkdir()
    _check(f"file://{tmp_path}/data/out", _settings(str(tmp_path / "data")))


def test_a_large_directory_is_checked_by_the_fixed_names_past_one_page(tmp_path, s3_endpoint, s3_bucket):
    """More entries than one listing page: the model's config.json (listed after 150 other names) is still
    found, on S3 by a HEAD, locally by its name."""
    from worker.engine.storage.s3 import s3_client
    from worker.service.uri_policy import LISTING_PAGE, PolicyError

    client = s3_client(s3_endpoint)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(LISTING_PAGE + 50):
        client.put_object(Bucket=s3_bucket, Key=f"big/a{i:04d}.txt", Body=b"")
        (big / f"a{i:04d}.txt").write_text("")
    settings = _settings(str(tmp_path), s3_endpoint)
    _check(f"s3://{s3_bucket}/big/out", settings)
    _check(f"file://{big}/out", settings)
    client.put_object(Bucket=s3_bucket, Key="big/config.json", Body=b"{}")
    (big / "config.json").write_text("{}")
    for uri in (f"s3://{s3_bucket}/big/out", f"file://{big}/out"):
        with pytest.raises(PolicyError):
            _check(uri, settings)


def test_the_workers_check_leaves_the_outputs_own_files_to_the_sink(tmp_path, s3_endpoint, s3_bucket):
    """A retry finds its earlier attempt's config.json and shards at the output itself: not a refusal there
    (the sink clears its own leftovers and refuses anyone else's); a model above the output still is."""
    from worker.engine.storage.s3 import s3_client
    from worker.service.uri_policy import PolicyError

    client = s3_client(s3_endpoint)
    run = tmp_path / "runs" / "job"
    run.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        client.put_object(Bucket=s3_bucket, Key=f"runs/job/{name}", Body=b"{}")
        (run / name).write_text("{}")
    settings = _settings(str(tmp_path), s3_endpoint)
    for uri in (f"s3://{s3_bucket}/runs/job", f"file://{run}"):
        _check(uri, settings, itself=False)
        with pytest.raises(PolicyError):
            _check(uri, settings)  # the API's check: the location already holds a model
    client.put_object(Bucket=s3_bucket, Key="runs/config.json", Body=b"{}")
    (tmp_path / "runs" / "config.json").write_text("{}")
    for uri in (f"s3://{s3_bucket}/runs/job", f"file://{run}"):
        with pytest.raises(PolicyError):
            _check(uri, settings, itself=False)


def test_an_unreachable_store_is_a_storage_error_not_a_refusal(tmp_path):
    from worker.devtools.loopback import free_port
    from worker.engine.errors import GraftError
    from worker.service.settings import Settings
    from worker.service.uri_policy import PolicyError

    settings = Settings(allowed_roots=str(tmp_path), s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
                        storage_timeout_seconds=1.0)
    with pytest.raises(GraftError) as info:  # the API answers 503 with Retry-After; the worker retries the job
        _check("s3://some-bucket/out", settings)
    assert info.value.code == "storage_error" and not isinstance(info.value, PolicyError)


# Through the service: the three routes that take an output, and the worker.

@pytest.fixture(scope="module")
def api(redis_url, trio, tmp_path_factory, s3_endpoint):
    """No worker: jobs stay queued. Any bucket (no GRAFT_ALLOWED_BUCKETS), as in the issue."""
    root = str(tmp_path_factory.mktemp("containment"))
    service = Service(redis_url, root, s3_endpoint=s3_endpoint,
                      GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}")
    try:
        yield service.start_api()
    finally:
        service.stop()


@pytest.fixture
def placed(api, s3_endpoint, s3_bucket):
    """(file:// base, s3:// base) of the shared models, fresh for each test."""
    shared = _file_layout(os.path.join(api.root, s3_bucket))
    _s3_layout(s3_endpoint, s3_bucket)
    return f"file://{shared}", f"s3://{s3_bucket}"


def test_jobs_preflights_and_previews_refuse_outputs_in_a_model(api, trio, placed, s3_endpoint, s3_bucket):
    before = _keys(s3_endpoint, s3_bucket)
    with api.client("beta") as b:
        jobs = len(b.get("/v1/jobs", params={"limit": 100}).json()["data"])
        for base in placed:
            for where in REFUSED:
                body = job_body(trio, output=f"{base}/{where}")
                for route in ("/v1/jobs:preview", "/v1/jobs", "/v1/preflights"):  # the preview first: it ignored output
                    _refused(b.post(route, json=body))
        assert len(b.get("/v1/jobs", params={"limit": 100}).json()["data"]) == jobs  # no job was created
    assert _keys(s3_endpoint, s3_bucket) == before  # nothing written, not even a claim


def test_previews_and_jobs_accept_outputs_beside_models(api, trio, placed):
    with api.client("beta") as b:
        for base in placed:
            for where in ACCEPTED:
                body = job_body(trio, output=f"{base}/{where}")
                plan = b.post("/v1/jobs:preview", json=body)
                assert plan.status_code == 200 and plan.json()["object"] == "graft.plan", plan.text
                for route in ("/v1/jobs", "/v1/preflights"):
                    assert b.post(route, json=body).status_code == 202, (route, where)
        assert b.post("/v1/jobs:preview", json=job_body(trio)).status_code == 200  # the default output


def test_outputs_inside_the_tenants_own_result_are_refused_too(api, trio, s3_endpoint, s3_bucket):
    """A tenant's earlier result is a model directory like any other: nothing is written inside it."""
    from worker.engine.storage.s3 import s3_client

    for name in ("config.json", "model.safetensors", "graft-manifest.json"):
        s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"mine/run1/{name}", Body=b"{}")
    with api.client("beta") as b:
        for route in ("/v1/jobs:preview", "/v1/jobs", "/v1/preflights"):
            _refused(b.post(route, json=job_body(trio, output=f"s3://{s3_bucket}/mine/run1/sub")))
            _refused(b.post(route, json=job_body(trio, output=f"s3://{s3_bucket}/mine/run1")))


def test_the_worker_refuses_a_model_published_above_the_output_after_submission(redis_url, trio, tmp_path,
                                                                               s3_endpoint, s3_bucket):
    svc = Service(redis_url, str(tmp_path), s3_endpoint=s3_endpoint,
                  GRAFT_ALLOWED_ROOTS=f"{tmp_path},{os.path.dirname(trio['source_base'])}")
    later = tmp_path / "later"
    try:
        svc.start_api()
        with svc.client("beta") as b:
            jobs = [b.post("/v1/jobs", json=job_body(trio, output=uri)) for uri in
                    (f"s3://{s3_bucket}/later/run", f"file://{later}/run", f"s3://{s3_bucket}/fine/run")]
            assert [r.status_code for r in jobs] == [202, 202, 202], [r.text for r in jobs]
            # Another tenant's model lands at the outputs' parents while the jobs wait in the queue.
            from worker.engine.storage.s3 import s3_client

            s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key="later/config.json", Body=b"{}")
            later.mkdir()
            (later / "config.json").write_text("{}")
            svc.start_worker()
            done = [wait_job(b, r.json()["id"], timeout=120) for r in jobs]
    finally:
        svc.stop()
    for doc in done[:2]:
        assert doc["status"] == "failed" and doc["error"]["code"] == "uri_not_allowed", doc
        assert "later" in doc["error"]["message"] and doc["attempt"] == 1, doc
    assert done[2]["status"] == "succeeded", done[2]  # beside them, a job runs as before
    assert _keys(s3_endpoint, s3_bucket, "later/") == ["later/config.json"]  # nothing written, no claim
    assert os.listdir(later) == ["config.json"]  # no output, no hidden temp directory


# The review: an output being written, a result named as one, shards past a page, idempotent replays.

def _claimed(endpoint: str, location: str):
    """The sink of a graft still writing `location` (S3's claim or a local staging directory in place)."""
    from worker.engine.storage.sinks import open_sink
    from worker.engine.storage.uris import parse_uri

    return open_sink(parse_uri(location, field="output"), endpoint_url=endpoint)


def test_an_output_being_written_protects_its_location(tmp_path, s3_endpoint, s3_bucket):
    """While tenant A's first shard uploads, its claim (or staging directory) is the only thing at its output:
    no one else's output goes at or under it (A's retry would clear it), but A's own retry still runs."""
    from worker.service.uri_policy import PolicyError

    settings = _settings(str(tmp_path), s3_endpoint)
    for base in (f"s3://{s3_bucket}", f"file://{tmp_path}"):
        sink = _claimed(s3_endpoint, f"{base}/a/out")
        try:
            inside = [f"{base}/a/out", f"{base}/a/out/x", f"{base}/a/out/x/y"]
            if base.startswith("file://"):
                inside.append(f"file://{sink.tmp}/x")  # the staging directory itself, named outright
            for uri in inside:
                with pytest.raises(PolicyError) as info:
                    _check(uri, settings)
                assert "another job is writing there" in info.value.message, (uri, info.value.message)
                if uri != f"{base}/a/out":
                    with pytest.raises(PolicyError):
                        _check(uri, settings, itself=False)  # the worker's check: another job's, not its own
            _check(f"{base}/a/out", settings, itself=False)  # a retry of A finds its own claim there
            _check(f"{base}/a/other", settings)  # beside it is fine
            _check(f"{base}/a/ou", settings)
        finally:
            sink.abort()
        _check(f"{base}/a/out/x", settings)  # once A is gone, its place is free again


def test_the_in_progress_markers_are_the_sinks_own_names():
    from worker.engine.storage import sinks
    from worker.service import uri_policy

    assert (uri_policy.PENDING, uri_policy.OWNER, uri_policy.STAGING, uri_policy.MANIFEST) == (
        sinks.PENDING, sinks.OWNER, sinks.STAGING, sinks.MANIFEST)


def test_a_result_is_named_a_graft_result_not_a_models_directory(tmp_path, s3_endpoint, s3_bucket):
    from worker.engine.storage.s3 import s3_client
    from worker.service.uri_policy import PolicyError

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    for name in ("config.json", "graft-manifest.json", "model.safetensors"):
        s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"runs/r1/{name}", Body=b"{}")
        (run / name).write_text("{}")
    settings = _settings(str(tmp_path), s3_endpoint)
    for uri in (f"s3://{s3_bucket}/runs/r1", f"s3://{s3_bucket}/runs/r1/sub", f"file://{run}", f"file://{run}/sub"):
        with pytest.raises(PolicyError) as info:
            _check(uri, settings)
        assert "inside a graft result" in info.value.message and "graft-manifest.json" in info.value.message, (
            uri, info.value.message)


def _past_a_page(directory, name: str) -> None:
    """`name` in `directory` after more than one listing page of other entries, in the order the directory
    lists them (ext4 lists in hash order, whatever the creation order)."""
    from worker.service.uri_policy import LISTING_PAGE

    directory.mkdir()
    (directory / name).write_text("")
    i = 0
    while os.listdir(directory).index(name) <= LISTING_PAGE + 50 and i < 5000:
        for _ in range(50):
            (directory / f"a{i:04d}").mkdir()
            i += 1
    assert os.listdir(directory).index(name) > LISTING_PAGE + 50


def test_shards_alone_past_the_first_page_are_found(tmp_path, s3_endpoint, s3_bucket):
    """A prefix of 150 subprefixes and one shard (no config.json, no index): found by one more bounded LIST of
    the names a shard is given; locally by a scan of up to LOCAL_SCAN entries. An in-progress claim listed
    after a full page is found by its fixed name."""
    from worker.engine.storage.s3 import s3_client
    from worker.service.uri_policy import LISTING_PAGE, PolicyError

    client = s3_client(s3_endpoint)
    for i in range(LISTING_PAGE + 50):
        client.put_object(Bucket=s3_bucket, Key=f"crowded/a{i:03d}/x", Body=b"")
        client.put_object(Bucket=s3_bucket, Key=f"busy/-{i:03d}/x", Body=b"")  # '-' lists before '.'
    client.put_object(Bucket=s3_bucket, Key="crowded/model-00001-of-00002.safetensors", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="busy/.graft-pending", Body=b"{}")
    _past_a_page(tmp_path / "crowded", "model-00001-of-00002.safetensors")
    settings = _settings(str(tmp_path), s3_endpoint)
    for uri in (f"s3://{s3_bucket}/crowded/out", f"file://{tmp_path}/crowded/out"):
        with pytest.raises(PolicyError) as info:
            _check(uri, settings)
        assert "model-00001-of-00002.safetensors" in info.value.message, info.value.message
    with pytest.raises(PolicyError) as info:
        _check(f"s3://{s3_bucket}/busy/out", settings)
    assert "another job is writing there" in info.value.message, info.value.message
    for i in range(LISTING_PAGE + 50):  # beside a crowded prefix without a model: still accepted
        client.put_object(Bucket=s3_bucket, Key=f"calm/a{i:03d}/x", Body=b"")
    _check(f"s3://{s3_bucket}/calm/out", settings)


def test_an_idempotent_replay_is_the_original_job_whatever_has_happened_since(api, trio, s3_endpoint, s3_bucket):
    """The job succeeded and published its result at the output, and a model has landed above it since: the
    replay of the identical request still answers the original job (202, Idempotent-Replayed), on both routes
    that take a key and both schemes; a new request there is refused, naming the result as one."""
    from worker.engine.storage.s3 import s3_client

    with api.client("beta") as b:
        for route in ("/v1/jobs", "/v1/preflights"):
            name = f"idem-{route.rsplit('/', 1)[-1]}"
            local = os.path.join(api.root, name)
            for output in (f"s3://{s3_bucket}/{name}/run", f"file://{local}/run"):
                body = job_body(trio, output=output)
                key = {"Idempotency-Key": f"{route}-{output}"}
                first = b.post(route, json=body, headers=key)
                assert first.status_code == 202, first.text
                # As if the job had run: its result at the output, and someone's model above it.
                for rel in ("run/graft-manifest.json", "run/config.json", "run/model.safetensors", "config.json"):
                    if output.startswith("s3://"):
                        s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"{name}/{rel}", Body=b"{}")
                    else:
                        os.makedirs(os.path.join(local, "run"), exist_ok=True)
                        with open(os.path.join(local, rel), "w") as fh:
                            fh.write("{}")
                again = b.post(route, json=body, headers=key)
                assert again.status_code == 202, (route, output, again.text)
                assert again.headers.get("idempotent-replayed") == "true"
                assert again.json()["id"] == first.json()["id"]
                fresh = b.post(route, json=body)  # no key: a new job, refused where the result now lies
                _refused(fresh)
                assert "graft result" in fresh.json()["errors"][0]["message"], fresh.text
