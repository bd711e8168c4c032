"""A local output is on disk before it is published: every file fdatasynced before the manifest is written, the
directory's entries synced before the rename that publishes it, the rename synced after; and the writer starts
writeback steadily as a file grows instead of leaving it all to the final sync (issue 17: dirty pages piling up
throttled the writer in bursts)."""

from __future__ import annotations

import os

import pytest

from worker.engine.storage import local_files
from worker.engine.storage.sinks import LocalSink
from worker.engine.storage.uris import parse_uri


@pytest.fixture
def calls(monkeypatch):
    """The sync calls and renames of the local sink, in order, each as (what, file name or None)."""
    seen: list[tuple[str, str | None]] = []

    def name_of(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    real_fdatasync, real_fsync, real_rename, real_create = os.fdatasync, os.fsync, os.rename, local_files._create

    def fdatasync(fd):
        seen.append(("fdatasync", name_of(fd)))
        return real_fdatasync(fd)

    def fsync(fd):
        seen.append(("fsync", name_of(fd)))
        return real_fsync(fd)

    def rename(src, dst, **kw):
        seen.append(("rename", os.path.basename(dst)))
        return real_rename(src, dst, **kw)

    def create(name, dir_fd):
        seen.append(("create", name))
        return real_create(name, dir_fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(local_files, "_create", create)
    return seen


def test_every_file_is_on_disk_before_the_manifest_and_the_rename_is_synced(tmp_path, calls):
    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    staging = os.path.basename(sink.tmp)
    big = os.urandom(3 << 20)
    writer = sink.open("model-00001-of-00002.safetensors", len(big))
    for i in range(0, len(big), 1 << 20):
        writer.write(big[i:i + (1 << 20)])
    writer.close()
    sink.put("config.json", b"{}")
    sink.commit(b'{"manifest": true}')

    manifest = sink.manifest_name
    created = calls.index(("create", manifest))
    for name in ("model-00001-of-00002.safetensors", "config.json"):
        assert calls.index(("fdatasync", name)) < created, calls
    assert calls.index(("fdatasync", manifest)) > created
    rename = calls.index(("rename", "out"))
    assert calls.index(("fsync", staging)) < rename, calls  # the entries, before they are published
    assert ("fsync", tmp_path.name) in calls[rename:], calls  # the parent, after the rename
    with open(tmp_path / "out" / "model-00001-of-00002.safetensors", "rb") as fh:
        assert fh.read() == big


def test_writeback_runs_steadily_behind_the_writer(tmp_path, monkeypatch):
    ranges: list[tuple[int, int, int]] = []
    monkeypatch.setattr(local_files, "SYNC_FILE_RANGE", lambda fd, start, n, flags: ranges.append((start, n, flags)))
    monkeypatch.setattr(local_files, "DIRTY_BYTES", 32 << 20)  # the mechanism, on a file of a test's size
    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    try:
        writer = sink.open("big.bin")
        chunk = bytes(3 << 20)  # not a multiple of the writeback step: ranges must still tile the file
        written = 0
        for _ in range(40):
            writer.write(chunk)
            written += len(chunk)
            started = sum(n for _, n, f in ranges if f == local_files._SYNC_WRITE)
            waited = sum(n for _, n, f in ranges if f == local_files._SYNC_WAIT)
            # Never more than one step not yet handed to writeback, nor more than the dirty bound (plus one step)
            # not yet waited for.
            assert written - started < local_files.WRITEBACK_BYTES + len(chunk)
            if written > 2 * local_files.DIRTY_BYTES:
                assert written - waited <= local_files.DIRTY_BYTES + local_files.WRITEBACK_BYTES + len(chunk)
        writer.close()
    finally:
        sink.abort()
    for flags in (local_files._SYNC_WRITE, local_files._SYNC_WAIT):
        spans = [(s, n) for s, n, f in ranges if f == flags]
        assert spans and spans[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False)), spans  # contiguous


def test_the_real_sync_file_range_is_found_and_accepts_a_file(tmp_path):
    if not os.path.exists("/proc/self"):
        pytest.skip("not Linux")
    assert local_files.SYNC_FILE_RANGE is not None
    with open(tmp_path / "f", "wb") as fh:
        fh.write(bytes(1 << 20))
        fh.flush()
        assert local_files.SYNC_FILE_RANGE(fh.fileno(), 0, 1 << 20, local_files._SYNC_WAIT) == 0


def test_a_failed_sync_closes_the_file_once(tmp_path, monkeypatch):
    """fdatasync failing (a full or failing disk) is a storage_error, and the abort that follows closes nothing
    more: the descriptor's number may already be another file's or socket's."""
    from worker.engine.errors import GraftError

    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    try:
        writer = sink.open("model.safetensors")
        writer.write(b"x" * 100)

        def failing(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(GraftError) as err:
            writer.close()
        assert err.value.code == "storage_error" and "No space left" in err.value.message
        bystander = os.open(os.devnull, os.O_RDONLY)  # the freed number, taken by someone else
        writer.abort()
        os.fstat(bystander)  # still open
        os.close(bystander)
    finally:
        monkeypatch.undo()
        sink.abort()
