"""Read access to a model directory wherever it lives: whole small files and ranged reads of big ones.

Every store is safe to call from several threads at once: the reader issues ranged reads from a pool.
The stores of each scheme are opened through its row in storage/schemes/ (local_files.LocalStore,
s3_store.S3Store, hub_store.HubStore); this module holds what they share.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from importlib import import_module

from worker.engine.errors import GraftError
from worker.engine.storage import schemes, trace
from worker.engine.storage.faults import StorageRetry, TransientStorageError, classify, describe
from worker.engine.storage.lanes import Lanes, RemoteReads
from worker.engine.storage.schemes.base import Access
from worker.engine.storage.uris import Location

log = logging.getLogger("graft.storage")

SMALL_FILE_CAP = 64 << 20  # config/tokenizer files larger than this are refused
CHUNK = 256 << 10  # a response is read in pieces this large: what a broken one delivered is kept to this


class Store(ABC):
    location: Location
    revision: str | None = None

    @abstractmethod
    def list_files(self) -> dict[str, int]:
        """Top-level file names mapped to their sizes."""

    @abstractmethod
    def read_into(self, name: str, start: int, view: memoryview) -> None:
        """Fill `view` with the file's bytes from `start`: the hot path, into reused buffers."""

    def stream_into(self, name: str, start: int, view: memoryview) -> None:
        """Like read_into, for the stream's reads, which walk each file mostly front to back."""
        self.read_into(name, start, view)

    def expect(self, reads: list[tuple[str, int, int]]) -> None:  # noqa: B027 - optional hook
        """The (file, start, length) reads stream_into will be asked for, in order (stores that fetch ahead
        follow it)."""

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            self.read_into(name, start, memoryview(buf))
        return buf

    def read_bytes(self, name: str) -> bytes:
        size = self.size(name)
        if size > SMALL_FILE_CAP:
            raise GraftError("invalid_input", f"{self.location}/{name} is {size} bytes; too large to read whole")
        return bytes(self.read_range(name, 0, size)) if size else b""

    def exists(self, name: str) -> bool:
        return name in self.files

    def size(self, name: str) -> int:
        try:
            return self.files[name]
        except KeyError:
            raise GraftError("input_not_found", f"{self.location}: no file {name}") from None

    @property
    def files(self) -> dict[str, int]:
        cached = getattr(self, "_files", None)
        if cached is None:
            cached = self._files = self.list_files()
        return cached

    def fingerprint(self, name: str) -> dict:
        """What identifies a file's content without reading it all, where the store knows it."""
        return {"size": self.size(name)}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class Confinement:
    """Where local files may be, judged on real paths: under one of `allowed`, and not under one of
    `denied` unless also under an allowed root inside it (a tenant's own directory within a shared
    output directory whose other tenants' outputs it must not read)."""

    def __init__(self, allowed: list[str], denied: list[str] | None = None) -> None:
        self.allowed = [os.path.join(os.path.realpath(r), "") for r in allowed if r]
        self.denied = [os.path.join(os.path.realpath(r), "") for r in denied or () if r]

    @classmethod
    def of(cls, allowed: list[str] | None, denied: list[str] | None = None) -> Confinement | None:
        """None (unconfined) when neither list is given."""
        if allowed is None and not denied:
            return None
        return cls(["/"] if allowed is None else allowed, denied)

    def admits(self, real: str) -> bool:
        path = os.path.join(real, "")
        if not any(path.startswith(a) for a in self.allowed):
            return False
        return all(not path.startswith(d) or any(path.startswith(a) and a.startswith(d) for a in self.allowed)
                   for d in self.denied)


def fd_path(fd: int, fallback: str) -> str:
    """Where an open descriptor really is: the kernel's name for it (no race with a swapped symlink),
    or the path's realpath where /proc is not mounted."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


class RemoteStore(Store):
    """Stores reached over HTTP: they report the checksums the server keeps instead of hashing, and serve the
    stream through lanes.Lanes: several ranged GETs at once per input, each on a pooled connection, filling
    windows ahead of the stream (memory: `reads.held` x `reads.window_bytes` per input).

    Every request goes through `retry` (faults.StorageRetry). A ranged read is idempotent, so a storage fault
    (a reset, a timeout, a 5xx, SlowDown, a response cut short) reopens the range where its bytes stopped:
    at once when the broken request had delivered some, after the retry's backoff otherwise; nothing is read
    twice. A request that receives no bytes for `reads.stall_seconds` times out and is re-issued the same
    way. A refusal of the request (404, 403) fails at once with its own code."""

    _meta: dict[str, dict]
    retry: StorageRetry = StorageRetry()
    reads: RemoteReads = RemoteReads()

    def _init_remote(self, reads: RemoteReads | None, retry: StorageRetry | None) -> None:
        self.retry = retry or StorageRetry()
        self.reads = reads or RemoteReads()
        self._closing = threading.Event()  # retries in flight give up: nobody waits for their bytes any more
        self.lanes = Lanes(self.reads, self.size, self._transfer, self._closing, str(self.location))

    @property
    def read_timeout(self) -> float:
        """Seconds a request may go without receiving bytes: the stall limit, within the storage timeout."""
        stall = self.reads.stall_seconds
        return min(self.retry.timeout, stall) if stall > 0 else self.retry.timeout

    @abstractmethod
    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        """A response streaming bytes [start, end) of the file, and how to close it."""

    def _transfer(self, name: str, start: int, end: int, take: Callable[[memoryview], None]) -> None:
        """Hand bytes [start, end) of the file to `take`, in order and each once, whatever breaks on the way."""
        pos = start
        what = f"{self.location}/{name}: reading bytes {start}-{end - 1}"

        def attempt() -> bool:  # True: done; False: cut short after some bytes, reopen from there at once
            nonlocal pos
            began = pos
            chunks, close = self._open(name, pos, end)
            try:
                for chunk in chunks:
                    if self._closing.is_set():
                        raise GraftError("storage_error", f"{what}: stopped, the input is being closed")
                    if len(chunk) > end - pos:
                        raise GraftError("storage_error", f"{what}: the server sent more bytes than asked for")
                    take(memoryview(chunk))
                    pos += len(chunk)
            except Exception as exc:
                fault = classify(exc)
                if pos > began and fault is not None and fault[1]:
                    log.warning("%s: %s after %d bytes; reopening from byte %d", what, describe(exc),
                                pos - began, pos)
                    return False
                raise
            finally:
                close()
            if pos < end:
                if pos > began:
                    return False
                # The listing said the bytes are there: a response cut short is the connection's fault.
                raise TransientStorageError(f"expected {end - pos} bytes at {pos}, the server sent none")
            return True

        while not self.retry.call(what, attempt, stop=self._closing):
            pass

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        if not len(view):
            return
        self.size(name)
        filled = 0

        def take(data: memoryview) -> None:
            nonlocal filled
            view[filled:filled + len(data)] = data
            filled += len(data)

        rec = trace.recorder()
        t_start = rec.now() if rec is not None else 0.0
        self._transfer(name, start, start + len(view), take)
        if rec is not None:  # a header, a side file: one request outside the lanes
            rec.add("read", t_start, input=str(self.location), file=name, start=start, bytes=len(view))

    def stream_into(self, name: str, start: int, view: memoryview) -> None:
        if start + len(view) > self.size(name):
            raise GraftError("invalid_safetensors", f"{self.location}/{name}: read past the end of the file")
        if len(view):
            self.lanes.read(name, start, view)

    def expect(self, reads: list[tuple[str, int, int]]) -> None:
        self.lanes.expect(reads)

    def close(self) -> None:
        self.lanes.close()

    def fingerprint(self, name: str) -> dict:
        return {"size": self.size(name), **self._meta.get(name, {})}


def open_store(location: Location, endpoint_url: str | None = None, *, reads: RemoteReads | None = None,
               allowed_roots: list[str] | None = None, denied_roots: list[str] | None = None,
               retry: StorageRetry | None = None) -> Store:
    """The store of `location`'s scheme. `reads`: how a remote input is read (lanes, windows;
    lanes.RemoteReads). `allowed_roots`/`denied_roots` confine a local store (see Confinement); None:
    unconfined."""
    access = Access(endpoint_url=endpoint_url, retry=retry, allowed_roots=allowed_roots, denied_roots=denied_roots,
                    reads=reads)
    return schemes.get(location.scheme).open_store(location, access)


# Where these lived before the schemes table: importers of the old names need not change.
_MOVED = {"LocalStore": "local_files", "S3Store": "s3_store", "HubStore": "hub_store"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"worker.engine.storage.{_MOVED[name]}"), name)
