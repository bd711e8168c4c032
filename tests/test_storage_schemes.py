"""The table of storage schemes as a seam: a scheme registered by a test (mem://, a few lines over a dict)
carries a real graft's inputs and output, byte for byte what the local graft writes; its declared faults
and policy are what the engine's classification and the service's URI policy apply; an unknown scheme is
refused with the table's names; and the API process imports no storage client library."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from graft_helpers import graft
from service_fixtures import job_body

from worker.engine.errors import GraftError
from worker.engine.storage import schemes
from worker.engine.storage.schemes.base import Access, BucketPrefixes, Faults, Listing, Page, Scheme
from worker.engine.storage.sinks import MANIFEST, FileWriter, Sink
from worker.engine.storage.stores import Store
from worker.engine.storage.uris import Location, parse_uri

SPACES: dict[str, dict[str, bytes]] = {}  # mem://<space>/<key>: the whole storage of the toy scheme
READS: list[tuple[str, int]] = []  # (file, bytes) of every ranged read the toy stores served


def _prefix(location: Location) -> str:
    return f"{location.prefix}/" if location.prefix else ""


class MemStore(Store):
    def __init__(self, location: Location) -> None:
        self.location = location
        keys, head = SPACES.get(location.bucket, {}), _prefix(location)
        self._data = {k[len(head):]: v for k, v in keys.items() if k.startswith(head) and "/" not in k[len(head):]}
        if not self._data:
            raise GraftError("input_not_found", f"{location}: nothing there")

    def list_files(self) -> dict[str, int]:
        return {name: len(data) for name, data in self._data.items()}

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        self.size(name)
        piece = self._data[name][start:start + len(view)]
        if len(piece) != len(view):
            raise GraftError("invalid_safetensors", f"{self.location}/{name}: ends before byte {start + len(view)}")
        view[:] = piece
        READS.append((name, len(view)))


class _MemWriter(FileWriter):
    def __init__(self, name: str, staged: dict[str, bytes]) -> None:
        super().__init__(name)
        self._staged, self._buf = staged, bytearray()

    def _write(self, data) -> None:
        self._buf += memoryview(data).cast("B")

    def _finish(self) -> None:
        self._staged[self.name] = bytes(self._buf)


class MemSink(Sink):
    """Files are staged apart and published all at once by the commit, the manifest last."""

    def __init__(self, location: Location) -> None:
        self.location = location
        if any(k.startswith(_prefix(location)) for k in SPACES.setdefault(location.bucket, {})):
            raise GraftError("output_exists", f"{location} already holds objects")
        self._staged: dict[str, bytes] = {}

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        return _MemWriter(name, self._staged)

    def commit(self, manifest: bytes) -> str:
        self.put(MANIFEST, manifest)
        SPACES[self.location.bucket].update({_prefix(self.location) + n: d for n, d in self._staged.items()})
        return f"{self.location}/{MANIFEST}"

    def abort(self) -> None:
        self._staged.clear()

    def abandon(self) -> None:
        self._staged.clear()

    def staged(self) -> Location:
        raise GraftError("invalid_request", "mem:// outputs cannot be read back before their commit")


class Hiccup(Exception):
    """What the toy storage's client raises for a dropped connection."""


class MemScheme(Scheme):
    name = "mem"
    example = "mem://space/prefix"
    writable = True
    faults = Faults(transport=lambda exc: isinstance(exc, Hiccup))

    def parse(self, uri, parsed, field) -> Location:
        if not parsed.netloc:
            raise GraftError("invalid_uri", f"{field}: no space in {uri}")
        return Location("mem", bucket=parsed.netloc, prefix=parsed.path.strip("/"))

    def render(self, location: Location) -> str:
        return f"mem://{location.bucket}/{location.prefix}"

    def child(self, location: Location, name: str) -> Location:
        return Location("mem", bucket=location.bucket, prefix=_prefix(location) + name)

    def open_store(self, location: Location, access: Access) -> Store:
        return MemStore(location)

    def open_sink(self, location: Location, access: Access) -> Sink:
        return MemSink(location)

    def ready(self, location: Location, endpoint_url: str | None) -> str:
        return "ok"


class _MemListing(Listing):
    def page(self, bucket: str, prefix: str, limit: int) -> Page | None:
        if bucket not in SPACES:
            return None
        below = sorted({k[len(prefix):].partition("/")[:2] for k in SPACES[bucket] if k.startswith(prefix)})
        entries = [prefix + n + s for n, s, in below][:limit]
        return Page([e for e in entries if not e.endswith("/")], [e for e in entries if e.endswith("/")],
                    len(below) > limit)

    def exists(self, bucket: str, key: str) -> bool:
        return key in SPACES.get(bucket, {})


class ConfinedMemScheme(MemScheme):
    """The same storage, confined by the service like a bucket store: data, no change to the policy's code."""

    policy = BucketPrefixes(allowlist="allowed_buckets")

    def listing(self, endpoint_url: str | None, timeout: float) -> Listing:
        return _MemListing()


SCHEME: Scheme = MemScheme()


@pytest.fixture
def mem(monkeypatch):
    """mem:// registered as a row of the table (this module, whose SCHEME is the row), for one test."""
    monkeypatch.setitem(schemes.SCHEMES, "mem", __name__)
    monkeypatch.setattr(sys.modules[__name__], "SCHEME", MemScheme())
    SPACES.clear()
    READS.clear()
    yield
    SPACES.clear()


def _upload(directory: str, space: str, prefix: str) -> str:
    keys = SPACES.setdefault(space, {})
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as fh:
            keys[f"{prefix}/{name}"] = fh.read()
    return f"mem://{space}/{prefix}"


def test_a_graft_reads_and_writes_through_a_registered_scheme(mem, trio, tmp_path, one_torch_thread):
    small = {"block_bytes": 64 << 10}  # many blocks, and shards: the stream's reads and writes, not one of each
    local, _ = graft(trio, str(tmp_path / "local"), settings_overrides=small, shard_size="100KB")
    uris = {role: _upload(path, "models", role) for role, path in trio.items()}
    result, _ = graft(uris, "mem://outputs/run-1", settings_overrides=small, shard_size="100KB")
    assert result.manifest_uri == f"mem://outputs/run-1/{MANIFEST}"
    written = {k.removeprefix("run-1/"): v for k, v in SPACES["outputs"].items()}
    on_disk = set(os.listdir(tmp_path / "local"))
    assert set(written) == on_disk
    for name in on_disk - {MANIFEST, "README.md"}:  # those two name the inputs' and the output's URIs
        assert written[name] == (tmp_path / "local" / name).read_bytes(), name
    shards = {r.path for r in local.files if r.path.endswith(".safetensors")}
    assert len(shards) > 1 and {r.path for r in result.files} >= shards
    weights = sum(n for name, n in READS if name.endswith(".safetensors"))
    assert weights >= sum(os.path.getsize(os.path.join(trio["target_base"], n)) for n in os.listdir(
        trio["target_base"]) if n.endswith(".safetensors")) // 2  # the tensors came through the toy store
    assert str(parse_uri("mem://outputs/run-1")) == "mem://outputs/run-1"


def test_a_failed_graft_publishes_nothing_through_a_registered_scheme(mem, trio):
    uris = {role: _upload(path, "models", role) for role, path in trio.items()}
    uris["target_base"] = "mem://models/absent"
    with pytest.raises(GraftError) as err:
        graft(uris, "mem://outputs/run-2")
    assert err.value.code == "input_not_found" and "mem://models/absent" in err.value.message
    assert not any(k.startswith("run-2/") for k in SPACES.get("outputs", {}))


def test_an_unknown_scheme_is_refused_with_the_tables_names(mem):
    with pytest.raises(GraftError) as err:
        parse_uri("gs://bucket/models/x", field="target_base")
    assert err.value.code == "invalid_uri"
    assert err.value.message == "target_base: unsupported scheme 'gs' (file, s3, hf or mem)"
    assert schemes.names() == "file, s3, hf or mem"


def test_the_cli_names_the_supported_schemes(trio, tmp_path):
    graft_cli = os.path.join(os.path.dirname(sys.executable), "graft")
    proc = subprocess.run([graft_cli, "run", "--source-base", trio["source_base"],
                           "--source-finetuned", trio["source_finetuned"], "--target-base", "gs://bucket/x",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[invalid_uri]" in proc.stderr and "unsupported scheme 'gs' (file, s3 or hf)" in proc.stderr, proc.stderr


def test_the_api_refuses_an_unknown_scheme_with_the_tables_names(redis_url, trio, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from worker.service.settings import Settings

    settings = Settings(redis_url=redis_url, api_keys="k-schemes:alpha", output_uri=f"file://{tmp_path}/out",
                        allowed_roots=f"{tmp_path},{os.path.dirname(trio['source_base'])}")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        auth = {"Authorization": "Bearer k-schemes"}
        for field, uri, names in (("target_base", "gs://bucket/x", "[Ff][Ii][Ll][Ee]|[Ss]3|[Hh][Ff]"),
                                  ("output", "hf://org/name", "[Ff][Ii][Ll][Ee]|[Ss]3")):
            refused = client.post("/v1/jobs", json={**job_body(trio), field: uri}, headers=auth)
            assert refused.status_code == 422, refused.text
            assert [e["field"] for e in refused.json()["errors"]] == [field]
            # The body's schema (and openapi.yaml) spells the table's schemes out: the inputs', the outputs'.
            assert f"^({names})://" in refused.json()["detail"]
        assert names == schemes.pattern(writable=True)


def test_the_service_policy_names_the_tables_schemes(mem):
    from worker.service.settings import Settings
    from worker.service.uri_policy import PolicyError, check_uri

    settings = Settings(allowed_roots="/tmp")
    with pytest.raises(PolicyError) as err:
        check_uri("gs://bucket/x", "target_base", settings)
    assert err.value.message == "target_base: unsupported scheme 'gs' (file, s3, hf or mem)"
    assert err.value.code == "uri_not_allowed" and err.value.details == {"field": "target_base"}
    with pytest.raises(PolicyError) as err:
        check_uri("/tmp/models/x", "target_base", settings)
    assert "file:///abs/path, s3://bucket/prefix, hf://org/name[@rev] or mem://space/prefix" in err.value.message
    # Registered without policy data: the engine takes it, the service does not know how to confine it.
    with pytest.raises(PolicyError) as err:
        check_uri("mem://models/t", "target_base", settings)
    assert "mem:// URIs are not served by this server" in err.value.message


def test_fault_classification_reads_the_table(mem, monkeypatch):
    from worker.engine.storage.faults import StorageRetry, classify

    assert classify(Hiccup("reset")) == ("storage_error", True)
    tries = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise Hiccup("reset")
        return "done"

    assert StorageRetry(budget=5, first_delay=0.001).call("mem://x: reading", flaky) == "done" and len(tries) == 3
    monkeypatch.delitem(schemes.SCHEMES, "mem")
    assert classify(Hiccup("reset")) is None  # unregistered, its client's exceptions are nobody's storage fault


def test_a_scheme_confined_by_its_declared_policy(mem, monkeypatch, tmp_path):
    from worker.service.settings import Settings
    from worker.service.uri_policy import PolicyError, check_output_placement, check_uri, parse_grants, scope_for

    monkeypatch.setattr(sys.modules[__name__], "SCHEME", ConfinedMemScheme())
    settings = Settings(allowed_buckets="shared", tenant_grants="beta=mem://team/beta",
                        output_uri="mem://outs/runs")
    assert parse_grants(settings.tenant_grants)["beta"] == [Location("mem", bucket="team", prefix="beta")]
    assert check_uri("mem://shared/m", "target_base", settings, tenant="alpha").bucket == "shared"
    assert check_uri("mem://team/beta/m", "target_base", settings, tenant="beta").prefix == "beta/m"
    for uri, tenant in (("mem://team/beta/m", "alpha"), ("mem://other/m", "beta"), ("mem://outs/runs/beta/x", "alpha"),
                        ("mem://user@shared/m", "alpha")):
        with pytest.raises(PolicyError):
            check_uri(uri, "target_base", settings, tenant=tenant)
    assert scope_for("alpha", settings).prefixes == (("mem", "outs", "runs/alpha"),)
    mine = check_uri("mem://outs/runs/alpha/x", "output", settings, output=True, tenant="alpha")
    assert mine.prefix == "runs/alpha/x"
    SPACES["shared"] = {"models/m/config.json": b"{}", "models/m/model.safetensors": b"x"}
    with pytest.raises(PolicyError) as err:
        check_output_placement(parse_uri("mem://shared/models/m/out"), "output", settings, tenant="alpha")
    assert "inside a model's directory (mem://shared/models/m holds config.json)" in err.value.message
    check_output_placement(parse_uri("mem://shared/elsewhere/out"), "output", settings, tenant="alpha")


def test_the_readiness_probe_is_the_schemes(mem, tmp_path):
    from app.routes_ops import _storage_check
    from worker.service.settings import Settings

    assert _storage_check(Settings(output_uri="mem://outs/runs")) == "ok"
    assert _storage_check(Settings(output_uri=f"file://{tmp_path}/out")) == "ok" and (tmp_path / "out").is_dir()
    assert _storage_check(Settings(output_uri="hf://org/name")).startswith("error: ")


def test_the_api_process_imports_no_storage_client_library():
    """The table's rows are imported by name, their client libraries by the stores and sinks that use them."""
    code = ("import sys, app.main\n"
            "from worker.engine.storage.uris import parse_uri\n"
            "from worker.service.uri_policy import check_uri\n"
            "[str(parse_uri(u)) for u in ('file:///m', 's3://bucket/m', 'hf://org/m')]\n"
            "print(sorted(m for m in ('boto3', 'botocore', 'torch', 'huggingface_hub', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
