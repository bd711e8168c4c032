"""Verified local copies of a remote diff artifact's shards, kept under the cache directory.

Applying a remote artifact read each shard twice over the link: once whole to check its sha256 before
anything is written, then again, in ranges, as the stream decoded it (issue 15's S3 bench: a sparse
artifact's second read cost the first apply about 2.5 s of an 18.9 s job at 40 MB/s). Now the check's read
is kept: the bytes are written to a local file as they are hashed, and once the digest matches the manifest
the stream reads that file, so what is applied is exactly what was verified (a shard rewritten between the
check and the stream can no longer slip in). The next apply of the same shard version reads no shard over
the link at all: a copy is named by the shard's version (its URI, size and S3 ETag, which changes whenever
the object is written) and its sha256, so a rewritten object is fetched and checked again.

The directory holds at most `limit` bytes: the least recently used copies go first. A copy is renamed into
place only when complete and verified; descriptors are opened at once, so an eviction by another process
never pulls a file from under a graft reading it. Where the directory cannot be written (read-only, full),
nothing is cached and the shard is read from the store as before.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable

from worker.engine.errors import GraftError
from worker.engine.storage.local_files import pread_full
from worker.engine.storage.stores import Store

SUBDIR = "artifact-shards"
SUFFIX = ".shard"
STALE_TMP_SECONDS = 3600  # a partial copy this old was left by a killed process
_write = os.write  # the copy's writes (a test's short-writing disk replaces this one, not os.write)


class CopySink:
    """Where a fetch writes the shard's bytes in order; a failed write (a full disk) stops the copy, never
    the check: `ok` says whether the copy is whole."""

    def __init__(self, fd: int) -> None:
        self.fd, self.ok, self.written = fd, True, 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while self.ok and view:
                n = _write(self.fd, view)  # may write less than asked (a nearly full disk)
                if n <= 0:
                    self.ok = False
                    break
                view = view[n:]
                self.written += n
        except OSError:
            self.ok = False


class ShardCache:
    def __init__(self, directory: str, limit: int) -> None:
        self.dir, self.limit = os.path.join(directory, SUBDIR), limit

    def path(self, identity: str, sha256: str) -> str:
        key = hashlib.sha256(f"{identity}|{sha256}".encode()).hexdigest()
        return os.path.join(self.dir, key + SUFFIX)

    def lookup(self, identity: str, size: int, sha256: str) -> int | None:
        """A read descriptor of the kept copy of this shard version, or None."""
        path = self.path(identity, sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        if os.fstat(fd).st_size != size:
            os.close(fd)
            return None
        try:
            os.utime(path)  # recently used: the last to be evicted
        except OSError:
            pass
        return fd

    def fetch(self, identity: str, size: int, sha256: str, read: Callable[[CopySink | None], str]
              ) -> tuple[int | None, str]:
        """(a read descriptor of the new verified copy or None, the digest `read` computed). `read` reads the
        whole shard, hashes it and writes it to the sink in order; the copy is kept only if its digest is
        `sha256` and it was written whole."""
        if size > self.limit:
            return None, read(None)
        path = self.path(identity, sha256)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # deltas: the owner's
        except OSError:
            return None, read(None)
        digest = None
        try:
            try:
                sink = CopySink(out)
                digest = read(sink)  # the store's errors go to the caller (the temp file removed)
                whole = sink.ok and sink.written == size
                if digest == sha256 and whole:
                    os.fsync(out)  # whole after a crash too: a hit is trusted by its name and size
            finally:
                os.close(out)
            if digest != sha256 or not whole:
                return None, digest
            # Opened before it is renamed into place: an eviction (this graft's other shards, another process)
            # can take the name, never the copy this graft verified.
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._make_room(size)
                os.rename(tmp, path)
            except OSError:
                pass  # not kept for the next graft; this one still reads what it verified
            return fd, digest
        except OSError:  # the fsync or the open: not kept; the digest stands (read before either)
            if digest is None:
                raise
            return None, digest
        finally:
            _unlink(tmp)  # gone already once renamed

    def _make_room(self, size: int) -> None:
        """Evict the least recently used copies until `size` more bytes fit (and partial copies left long
        ago by killed processes)."""
        kept, now = [], time.time()
        for entry in os.scandir(self.dir):
            try:
                st = entry.stat()
            except OSError:
                continue
            if entry.name.endswith(SUFFIX):
                kept.append((st.st_mtime, st.st_size, entry.path))
            elif ".tmp-" in entry.name and now - st.st_mtime > STALE_TMP_SECONDS:
                _unlink(entry.path)
        total = sum(s for _, s, _ in kept)
        for _mtime, nbytes, path in sorted(kept):
            if total + size <= self.limit:
                break
            _unlink(path)
            total -= nbytes


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class KeptShards(Store):
    """A remote artifact's store whose verified shards are read from their kept copies (open descriptors, closed
    with the store); everything else goes to the store itself."""

    def __init__(self, inner: Store, kept: dict[str, int]) -> None:
        self.inner, self.kept = inner, kept
        self.location, self.revision = inner.location, inner.revision

    def list_files(self) -> dict[str, int]:
        return dict(self.inner.files)

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        fd = self.kept.get(name)
        if fd is None:
            return self.inner.read_into(name, start, view)
        if pread_full(fd, start, view, f"{self.location}/{name} (its verified local copy)") < len(view):
            raise GraftError("storage_error", f"{self.location}/{name}: the verified local copy is shorter "
                             f"than byte {start + len(view)}")

    def stream_into(self, name: str, start: int, view: memoryview) -> None:
        if name in self.kept:
            return self.read_into(name, start, view)
        return self.inner.stream_into(name, start, view)

    def expect(self, reads: list[tuple[str, int, int]]) -> None:
        self.inner.expect([r for r in reads if r[0] not in self.kept])

    def fingerprint(self, name: str) -> dict:
        return self.inner.fingerprint(name)

    def path(self, name: str) -> str:
        return self.inner.path(name)

    def close(self) -> None:
        kept, self.kept = self.kept, {}
        for fd in kept.values():
            os.close(fd)
        self.inner.close()


def shard_cache_for(cache_dir: str, limit: int) -> ShardCache | None:
    """The kept-copies cache of an engine's settings (GRAFT_CACHE_DIR, GRAFT_ARTIFACT_CACHE_BYTES); None when
    either is off."""
    return ShardCache(cache_dir, limit) if cache_dir and limit > 0 else None
