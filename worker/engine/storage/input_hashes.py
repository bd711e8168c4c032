"""sha256 of every input file for the manifest, on a side thread.

Hashing a large local input costs about a core-second per 1.8 GB, so digests are remembered per
(path, inode, size, mtime): grafting the same fine-tune onto several targets, or retrying a job, hashes
each file once. Remote stores report the checksums they keep (S3 ETag, the hub's LFS sha256)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading

from worker.engine.storage.local_files import LocalStore
from worker.engine.storage.model import ResolvedModel

HASH_CHUNK = 8 << 20


class HashingStopped(Exception):
    """The graft the digests were for ended first."""


def sha256_file(path: str, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            if stop is not None and stop.is_set():
                raise HashingStopped()
            digest.update(view[:n])
    return digest.hexdigest()


class DigestCache:
    """A small JSON file of known digests; a stale or unreadable cache only costs a re-hash."""

    def __init__(self, directory: str | None) -> None:
        self.path = os.path.join(directory, "sha256-v1.json") if directory else None
        self._entries: dict[str, str] = {}
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as fh:
                    self._entries = json.load(fh)
            except (OSError, ValueError):
                self._entries = {}
        self._dirty = False

    @staticmethod
    def _key(path: str) -> str:
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"

    def digest(self, path: str, stop: threading.Event | None = None) -> str:
        key = self._key(path)
        found = self.known(key)
        if found is None:
            found = sha256_file(path, stop)
            self.remember(key, found)
        return found

    def known(self, identity: str) -> str | None:
        """The digest remembered for an identity: a local file's (_key), or a remote object's (its URI, size and
        the store's own version token: an S3 ETag changes whenever the object is written again)."""
        return self._entries.get(identity)

    def remember(self, identity: str, digest: str) -> None:
        if self._entries.get(identity) != digest:
            self._entries[identity] = digest
            self._dirty = True

    def save(self) -> None:
        if not (self.path and self._dirty):
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path))
            with os.fdopen(fd, "w") as fh:
                json.dump(self._entries, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache we cannot write is a cache we do without


class InputHasher(threading.Thread):
    """The digests on a side thread while the graft streams; as a context manager it is started on entry and,
    on the way out whatever happened, told to stop and joined: a failed or cancelled graft leaves no thread
    hashing inputs whose stores are about to be closed."""

    def __init__(self, models: dict[str, ResolvedModel], enabled: bool, cache_dir: str | None) -> None:
        super().__init__(name="graft-hash", daemon=True)
        self.models, self.enabled, self.cache_dir = models, enabled, cache_dir
        self.result: dict[str, dict] = {}
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def __enter__(self) -> InputHasher:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.join()

    def run(self) -> None:
        try:
            cache = DigestCache(self.cache_dir)
            for role, model in self.models.items():
                store = model.store
                files = {}
                for name in sorted(store.files):
                    if self.stop.is_set():
                        return
                    entry = store.fingerprint(name)
                    if self.enabled and isinstance(store, LocalStore) and "sha256" not in entry:
                        entry["sha256"] = cache.digest(store.path(name), self.stop)
                    files[name] = entry
                self.result[role] = files
            cache.save()
        except HashingStopped:
            pass
        except BaseException as exc:
            self.error = exc
