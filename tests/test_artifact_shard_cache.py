"""A remote diff artifact's shards are read over the link once per version (worker/engine/diffs/shard_cache.py):
the check's bytes are kept as a verified local copy that the stream applies; the next apply of the same shard
version reads no shard from S3; a shard written again is fetched, checked and refused; the cache stays under its
limit, least recently used first out; an unwritable cache only costs the copy."""

from __future__ import annotations

import os

import pytest
from conftest import upload_dir
from graft_helpers import settings
from test_diff_artifacts import extract, same_files, three_model

from worker.engine import GraftOptions, GraftRequest, run_graft
from worker.engine.diffs import shard_cache
from worker.engine.errors import GraftError
from worker.engine.planning.recipe import Recipe
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.s3_store import S3Store


def apply_remote(diff: str, target: str, out, cache_dir: str, **overrides):
    recipe = Recipe.single("", "", target, GraftOptions(alpha=1.0), diff=diff)
    return run_graft(GraftRequest(recipe, str(out)), settings=settings(cache_dir=cache_dir, **overrides))


def shard_names(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("diff-") and n.endswith(".safetensors"))


def kept(cache_dir: str) -> list[str]:
    path = os.path.join(cache_dir, shard_cache.SUBDIR)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.fixture
def remote_diff(trio, tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("GRAFT_S3_ENDPOINT_URL", s3_endpoint)
    extract(trio, tmp_path / "diff")
    return upload_dir(s3_endpoint, str(tmp_path / "diff"), s3_bucket, "kept/diff")


def test_the_verified_copy_is_what_is_applied_and_the_next_apply_reads_no_shard(trio, tmp_path, remote_diff,
                                                                               s3_bucket, s3_endpoint, monkeypatch,
                                                                               one_torch_thread):
    cache_dir = str(tmp_path / "cache")
    real_fetch = shard_cache.ShardCache.fetch
    shard = shard_names(tmp_path / "diff")[0]

    def fetch_then_spoil(self, *args):
        out = real_fetch(self, *args)
        damaged = bytearray((tmp_path / "diff" / shard).read_bytes())
        damaged[-100:] = bytes(100)  # rewritten between the check and the stream: never applied
        s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"kept/diff/{shard}", Body=bytes(damaged))
        return out

    monkeypatch.setattr(shard_cache.ShardCache, "fetch", fetch_then_spoil)
    apply_remote(remote_diff, trio["target_base"], tmp_path / "first", cache_dir)
    monkeypatch.setattr(shard_cache.ShardCache, "fetch", real_fetch)
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"kept/diff/{shard}",
                                      Body=(tmp_path / "diff" / shard).read_bytes())
    three_model(trio, tmp_path / "ref")
    assert same_files(str(tmp_path / "first"), str(tmp_path / "ref")) == []  # exact: the three-model bytes
    copies = kept(cache_dir)
    assert len(copies) == len(shard_names(tmp_path / "diff")) and all(c.endswith(".shard") for c in copies)

    real = S3Store.read_into, S3Store.stream_into

    def guarded(which):
        def read(self, name, start, view):
            if name.startswith("diff-") and name.endswith(".safetensors"):
                raise AssertionError(f"{name} read from S3 again")
            return real[which](self, name, start, view)
        return read

    monkeypatch.setattr(S3Store, "read_into", guarded(0))
    monkeypatch.setattr(S3Store, "stream_into", guarded(1))
    apply_remote(remote_diff, trio["target_base"], tmp_path / "second", cache_dir)
    assert same_files(str(tmp_path / "second"), str(tmp_path / "ref")) == []


def test_a_shard_written_again_is_fetched_checked_and_refused(trio, tmp_path, remote_diff, s3_bucket, s3_endpoint,
                                                              one_torch_thread):
    cache_dir = str(tmp_path / "cache")
    apply_remote(remote_diff, trio["target_base"], tmp_path / "first", cache_dir)
    before = kept(cache_dir)
    shard = shard_names(tmp_path / "diff")[0]
    data = bytearray((tmp_path / "diff" / shard).read_bytes())
    data[-3] ^= 0xFF  # a new version (a new ETag) that no longer matches the manifest
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"kept/diff/{shard}", Body=bytes(data))
    with pytest.raises(GraftError) as err:
        apply_remote(remote_diff, trio["target_base"], tmp_path / "second", cache_dir)
    assert err.value.code == "invalid_diff" and "sha256" in err.value.message
    assert not (tmp_path / "second").exists()
    assert kept(cache_dir) == before  # the bad version is not kept


def test_the_cache_keeps_under_its_limit_least_recently_used_first_out(tmp_path):
    cache = shard_cache.ShardCache(str(tmp_path), limit=250)
    blobs = {f"v{i}": bytes([i]) * 100 for i in range(3)}

    def fetch(identity):
        import hashlib

        data = blobs[identity]
        digest = hashlib.sha256(data).hexdigest()

        def read(sink):
            if sink is not None:
                sink.write(data)
            return digest

        fd, got = cache.fetch(identity, len(data), digest, read)
        assert got == digest and fd is not None
        os.close(fd)
        return digest

    d0, d1 = fetch("v0"), fetch("v1")
    os.utime(cache.path("v0", d0), (1, 1))  # v0 used longest ago
    fd = cache.lookup("v1", 100, d1)
    assert fd is not None and os.read(fd, 200) == blobs["v1"]
    os.close(fd)
    d2 = fetch("v2")  # 300 > 250: the least recently used copy goes
    assert cache.lookup("v0", 100, d0) is None
    for identity, digest in (("v1", d1), ("v2", d2)):
        fd = cache.lookup(identity, 100, digest)
        assert fd is not None
        os.close(fd)
    assert cache.lookup("v1", 99, d1) is None  # a copy of another size is not this shard

    big_read = []
    fd, _ = cache.fetch("huge", 1000, "x", lambda sink: big_read.append(sink) or "x")
    assert fd is None and big_read == [None]  # past the limit: checked, not kept


def test_an_unwritable_cache_only_costs_the_copy(trio, tmp_path, remote_diff, one_torch_thread):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would be")
    apply_remote(remote_diff, trio["target_base"], tmp_path / "applied", str(blocker))
    three_model(trio, tmp_path / "ref")
    assert same_files(str(tmp_path / "applied"), str(tmp_path / "ref")) == []


def test_a_cache_of_zero_bytes_keeps_nothing(trio, tmp_path, remote_diff, one_torch_thread):
    cache_dir = str(tmp_path / "cache")
    apply_remote(remote_diff, trio["target_base"], tmp_path / "applied", cache_dir, artifact_cache_bytes=0)
    assert kept(cache_dir) == []


class FakeRemote:
    """A remote store of in-memory shards with ETags; `fail` names a shard whose reads raise."""

    def __init__(self, shards: dict[str, bytes], fail: str | None = None) -> None:
        from worker.engine.storage.uris import parse_uri

        self.location, self.revision, self.data, self.fail = parse_uri("s3://fake/art"), None, shards, fail
        self.reads: list[str] = []

    files = property(lambda self: {n: len(d) for n, d in self.data.items()})

    def exists(self, name):
        return name in self.data

    def size(self, name):
        return len(self.data[name])

    def fingerprint(self, name):
        import hashlib

        return {"size": len(self.data[name]), "etag": hashlib.md5(self.data[name]).hexdigest()}

    def read_range(self, name, start, length):
        self.reads.append(name)
        if name == self.fail:
            raise GraftError("storage_error", f"{name}: the link broke")
        return bytearray(self.data[name][start:start + length])


def manifest_of(shards: dict[str, bytes]):
    import hashlib
    from types import SimpleNamespace

    from worker.engine.diffs.artifact import ShardRecord

    return SimpleNamespace(shards=[ShardRecord(path=n, size=len(d), sha256=hashlib.sha256(d).hexdigest())
                                   for n, d in shards.items()])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_is_left_open_when_one_shard_fails(tmp_path):
    from worker.engine.diffs.artifact import verify_shards

    shards = {f"diff-{i:05d}.safetensors": os.urandom(3000 + i) for i in range(4)}
    cache = shard_cache.ShardCache(str(tmp_path), 1 << 20)
    verify_shards(FakeRemote(shards), manifest_of(shards), "s3://fake/art", None, cache)  # fds dropped on purpose
    before = open_fds()
    for _ in range(3):  # three shards kept (hits), the fourth's read fails
        with pytest.raises(GraftError) as err:
            verify_shards(FakeRemote(dict(shards, **{"diff-00003.safetensors": os.urandom(3003)}),
                                     fail="diff-00003.safetensors"), manifest_of(shards), "s3://fake/art", None, cache)
        assert err.value.code == "storage_error"
    assert open_fds() == before


def test_a_short_write_of_the_copy_keeps_no_copy_and_the_check_stands(tmp_path, monkeypatch):
    from worker.engine.diffs.artifact import verify_shards

    shards = {"diff-00001.safetensors": os.urandom(5000)}
    monkeypatch.setattr(shard_cache, "_write", lambda fd, data: os.write(fd, bytes(data)[:len(data) // 2])
                        if len(data) > 1000 else 0)  # a nearly full disk: short writes, then none at all
    cache = shard_cache.ShardCache(str(tmp_path), 1 << 20)
    fds = verify_shards(FakeRemote(shards), manifest_of(shards), "s3://fake/art", None, cache)
    assert fds == {} and kept(str(tmp_path)) == []  # checked, not kept; no partial copy left


def test_a_shard_past_the_limit_uses_the_digest_remembered_for_its_version(tmp_path):
    from worker.engine.diffs.artifact import verify_shards
    from worker.engine.storage.input_hashes import DigestCache

    shards = {"diff-00001.safetensors": os.urandom(5000)}
    cache = shard_cache.ShardCache(str(tmp_path), 100)  # too small to keep it
    for expect_reads in (True, False):
        store = FakeRemote(shards)
        assert verify_shards(store, manifest_of(shards), "s3://fake/art", DigestCache(str(tmp_path)), cache) == {}
        assert bool(store.reads) == expect_reads


def test_a_manifest_listing_a_shard_twice_is_refused(trio, tmp_path, one_torch_thread):
    import json

    extract(trio, tmp_path / "diff")
    path = tmp_path / "diff" / "diff-manifest.json"
    doc = json.loads(path.read_text())
    doc["shards"] = doc["shards"] * 2
    path.write_text(json.dumps(doc))
    with pytest.raises(GraftError) as err:
        apply_remote(str(tmp_path / "diff"), trio["target_base"], tmp_path / "out", str(tmp_path / "cache"))
    assert err.value.code == "invalid_diff" and "twice" in err.value.message
