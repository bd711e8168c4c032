"""Large local output files go around the page cache (worker/engine/storage/direct_writes.py): O_DIRECT writes
of page-aligned staging buffers, the unaligned tail through the page cache. The bytes and the sha256 are those
written; a failed write is a storage_error; where the file system refuses O_DIRECT the file is written as
before; a whole graft writes the same bytes either way."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import pytest
from graft_helpers import graft

from worker.engine.errors import GraftError
from worker.engine.storage import direct_writes, local_files
from worker.engine.storage.sinks import LocalSink
from worker.engine.storage.uris import parse_uri

STAGE = 3 * direct_writes.ALIGN  # small staging buffers: a test's file crosses many of them


def direct_supported(directory) -> bool:
    fd = os.open(os.path.join(directory, ".probe"), os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        return direct_writes.set_direct(fd, True)
    finally:
        os.close(fd)
        os.unlink(os.path.join(directory, ".probe"))


@pytest.fixture
def tmp_path(tmp_path):
    """A directory whose file system takes O_DIRECT: the test's own where it does (a tmpfs /tmp does not), else
    one beside the repository's checkout (removed afterwards)."""
    if direct_supported(tmp_path):
        yield tmp_path
        return
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache")
    os.makedirs(root, exist_ok=True)
    path = tempfile.mkdtemp(prefix="direct-", dir=root)
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_direct(monkeypatch, tmp_path):
    if not direct_supported(tmp_path):
        pytest.skip("neither the test's directory nor the checkout's file system takes O_DIRECT")
    monkeypatch.setattr(direct_writes, "STAGING_BYTES", STAGE)
    monkeypatch.setattr(local_files, "DIRECT_MIN_BYTES", 1)


@pytest.mark.parametrize("sizes", [
    [37, 1, 4095, 2 * STAGE, 10_000, 3],  # a tail shorter than a block after many buffers
    [STAGE, STAGE],  # ends on a buffer's edge: no tail
    [100],  # nothing aligned at all: the tail alone
    [STAGE - 1, 1, direct_writes.ALIGN],  # ends on an aligned length inside a buffer
])
def test_a_large_file_keeps_its_bytes_and_digest(tmp_path, small_direct, sizes):
    data = os.urandom(sum(sizes))
    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    try:
        writer = sink.open("model.safetensors", len(data))
        assert writer._direct is not None
        assert fcntl.fcntl(writer._fd, fcntl.F_GETFL) & os.O_DIRECT
        at = 0
        for n in sizes:
            writer.write(memoryview(data)[at:at + n])
            at += n
        record = writer.close()
        sink.commit(b"{}")
    except BaseException:
        sink.abort()
        raise
    assert record.size == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data


def test_small_files_and_refusing_file_systems_go_through_the_page_cache(tmp_path, monkeypatch):
    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    try:
        small = sink.open("config.json", 100)
        assert small._direct is None
        small.abort()
        monkeypatch.setattr(local_files, "DIRECT_MIN_BYTES", 1)
        monkeypatch.setattr(local_files, "set_direct", lambda fd, on: False)  # tmpfs's answer
        data = os.urandom(50_000)
        writer = sink.open("model.safetensors", len(data))
        assert writer._direct is None
        writer.write(data)
        assert writer.close().sha256 == hashlib.sha256(data).hexdigest()
        sink.commit(b"{}")
    except BaseException:
        sink.abort()
        raise
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data


def test_a_failed_direct_write_is_a_storage_error_and_nothing_is_published(tmp_path, small_direct, monkeypatch):
    real = os.pwrite
    calls = []

    def pwrite(fd, view, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    sink = LocalSink(parse_uri(str(tmp_path / "out")))
    writer = sink.open("model.safetensors", 10 * STAGE)
    with pytest.raises(GraftError) as err:
        for _ in range(10):
            writer.write(bytes(STAGE))
        writer.close()
    assert err.value.code == "storage_error" and "No space left" in err.value.message
    buffers = writer._direct._buffers if writer._direct is not None else []
    writer.abort()
    assert all(b.closed for b in buffers)  # the staging buffers released on the abort
    sink.abort()
    assert not (tmp_path / "out").exists()


def test_a_graft_writes_the_same_bytes_around_the_page_cache(trio, tmp_path, small_direct, monkeypatch):
    graft(trio, str(tmp_path / "direct"))
    monkeypatch.setattr(local_files, "set_direct", lambda fd, on: False)
    graft(trio, str(tmp_path / "cached"))
    names_of = ("direct", "cached")
    names = sorted(os.listdir(tmp_path / "direct"))
    assert names == sorted(os.listdir(tmp_path / "cached")) and any(n.endswith(".safetensors") for n in names)
    for name in names:
        if name != "graft-manifest.json":  # which names its own output's path
            assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "cached" / name).read_bytes(), name
    files = [json.loads((tmp_path / d / "graft-manifest.json").read_text())["output"]["files"] for d in names_of]
    assert files[0] == files[1]
