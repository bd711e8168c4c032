"""Read access to a model directory wherever it lives: whole small files and ranged reads of big ones.

Every store is safe to call from several threads at once: the reader issues ranged reads from a pool.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry, TransientStorageError, classify, describe
from worker.engine.storage.lanes import Lanes, RemoteReads
from worker.engine.storage.s3 import s3_client
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


class LocalStore(Store):
    """A local model directory. Confined, every file is checked after it is opened, on the descriptor
    itself, to lie where the confinement admits: a symlink inside the directory (or a file swapped for
    one) cannot make the graft read, copy or report the digest of a file outside the allowed roots."""

    def __init__(self, location: Location, confinement: Confinement | None = None) -> None:
        self.location = location
        self.root = location.path
        self.confinement = confinement
        if not os.path.isdir(self.root):
            raise GraftError("input_not_found", f"{location}: not a directory")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def list_files(self) -> dict[str, int]:
        out = {}
        try:
            for entry in os.scandir(self.root):
                if self.confinement is not None and entry.is_symlink() and not self.confinement.admits(
                        os.path.realpath(entry.path)):
                    # Refused at once, not only when opened: the input hashes would otherwise report the
                    # digest of a file outside the roots (they hash every file the directory lists).
                    raise self._escape(entry.name)
                if entry.is_file():
                    out[entry.name] = entry.stat().st_size
        except OSError as exc:
            raise GraftError("storage_error", f"{self.location}: cannot list: {exc.strerror}") from None
        return out

    def _escape(self, name: str) -> GraftError:
        # Where the link leads is not said: that would tell a client about files it may not see.
        return GraftError("uri_not_allowed", f"{self.location}/{name} resolves outside the allowed roots")

    def _open(self, name: str) -> int:
        if name not in self.files:
            raise GraftError("input_not_found", f"{self.location}: no file {name}")
        path = os.path.join(self.root, name)
        try:
            # O_NONBLOCK: a file swapped for a FIFO since the listing must not block the open forever.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise GraftError("input_not_found", f"{self.location}/{name}: cannot open: {exc.strerror}") from None
        try:
            if self.confinement is not None and not self.confinement.admits(fd_path(fd, path)):
                raise self._escape(name)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GraftError("invalid_input", f"{self.location}/{name} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = self._fds[name] = self._open(name)
        return fd

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        fd = self._fd(name)
        length = len(view)
        got = 0
        while got < length:
            try:
                n = os.preadv(fd, [view[got:]], start + got)
            except OSError as exc:
                raise GraftError("storage_error", f"{self.location}/{name}: read failed: {exc.strerror}") from None
            if n == 0:
                raise GraftError("invalid_safetensors",
                                 f"{self.location}/{name}: file ends before byte {start + length}")
            got += n

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


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
        self.lanes = Lanes(self.reads, self.size, self._transfer, self._closing)

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

        self._transfer(name, start, start + len(view), take)

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


class S3Store(RemoteStore):
    def __init__(self, location: Location, endpoint_url: str | None = None,
                 retry: StorageRetry | None = None, reads: RemoteReads | None = None) -> None:
        self.location = location
        self._init_remote(reads, retry)
        self.client = self.client_for(endpoint_url, self.retry, self.reads)
        self._meta: dict[str, dict] = {}

    @staticmethod
    def client_for(endpoint_url: str | None = None, retry: StorageRetry | None = None,
                   reads: RemoteReads | None = None):
        """The client S3 inputs are read with: its wait for the next bytes (an answer's headers or its body's
        next chunk) is the stall limit; every lane of three inputs has a pooled connection."""
        retry, reads = retry or StorageRetry(), reads or RemoteReads()
        stall = reads.stall_seconds
        return s3_client(endpoint_url, retry.timeout, read_timeout=min(retry.timeout, stall) if stall > 0 else None,
                         connections=3 * reads.lane_count + 8)

    def _key(self, name: str) -> str:
        return f"{self.location.prefix}/{name}" if self.location.prefix else name

    def list_files(self) -> dict[str, int]:
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""

        def attempt() -> tuple[dict[str, int], dict[str, dict]]:  # a failed listing starts over
            out: dict[str, int] = {}
            meta: dict[str, dict] = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name:
                        out[name] = obj["Size"]
                        meta[name] = {"etag": obj.get("ETag", "").strip('"')}
            return out, meta

        out, meta = self.retry.call(f"{self.location}: listing", attempt)
        self._meta.update(meta)
        if not out:
            raise GraftError("input_not_found", f"{self.location}: no objects under this prefix")
        return out

    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        resp = self.client.get_object(Bucket=self.location.bucket, Key=self._key(name),
                                      Range=f"bytes={start}-{end - 1}")
        body = resp["Body"]
        if not str(resp.get("ContentRange", "")).startswith(f"bytes {start}-") and not (
                start == 0 and end == self.size(name)):
            body.close()
            # A server that ignored Range would hand us the object's first bytes as if they were these.
            raise GraftError("storage_error", f"{self.location}/{name}: the server did not honour the Range "
                             f"header (Content-Range {resp.get('ContentRange')!r})")
        return body.iter_chunks(CHUNK), body.close


# A cached location that answers these has expired (signed URLs do) or moved: ask the hub again.
_STALE_LOCATION = {301, 302, 303, 307, 308, 401, 403, 404, 410}


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class HubStore(RemoteStore):
    """A Hugging Face hub repository, pinned to the commit its revision resolves to. The hub answers a file's
    `resolve/` URL with a redirect to where its bytes are (a CDN, for large files): the redirect is followed
    once per file, and every ranged read after goes straight to that final location."""

    def __init__(self, location: Location, retry: StorageRetry | None = None,
                 reads: RemoteReads | None = None) -> None:
        import httpx
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        self.location = location
        self._init_remote(reads, retry)
        self.endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        info = self._model_info()
        self.revision = info.sha
        self._files = {}
        self._meta = {}
        for sib in info.siblings or []:
            if "/" in sib.rfilename:
                continue
            self._files[sib.rfilename] = sib.size or 0
            meta = {}
            if sib.lfs is not None:
                meta["sha256"] = sib.lfs.sha256
            if sib.blob_id:
                meta["git_blob"] = sib.blob_id
            self._meta[sib.rfilename] = meta
        # Every lane keeps a connection open from one ranged GET to the next.
        pool = httpx.Limits(max_connections=self.reads.lane_count + 4,
                            max_keepalive_connections=self.reads.lane_count + 4)
        self._http = httpx.Client(headers=build_hf_headers(), follow_redirects=False, limits=pool,
                                  timeout=httpx.Timeout(self.retry.timeout, read=self.read_timeout))
        self._final: dict[str, str] = {}  # file -> where its bytes are
        self._resolving: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _model_info(self):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        location = self.location

        def attempt():
            try:
                return HfApi(endpoint=self.endpoint).model_info(location.repo, revision=location.revision,
                                                                files_metadata=True)
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
                # The hub answers 401 for a repository it will not admit exists: not found, whatever the status.
                raise GraftError("input_not_found", f"{location}: cannot resolve on the hub: {exc}") from exc

        try:
            return self.retry.call(f"{location}: resolving on the hub", attempt)
        except GraftError:
            raise
        except Exception as exc:  # not a storage fault: a name or revision the hub client refuses
            raise GraftError("input_not_found", f"{location}: cannot resolve on the hub: {exc}") from exc

    def list_files(self) -> dict[str, int]:
        return self._files

    def _url(self, name: str) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.location.repo}/resolve/{self.revision}/{name}"

    def _get(self, url: str, start: int, end: int, follow: bool):
        # identity: a compressed ranged response would not be the file's bytes.
        request = self._http.build_request("GET", url, headers={"Range": f"bytes={start}-{end - 1}",
                                                                "Accept-Encoding": "identity"})
        if _origin(url) != _origin(self.endpoint):
            request.headers.pop("authorization", None)  # the hub's token is for the hub only
        return self._http.send(request, stream=True, follow_redirects=follow)

    def _file_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._resolving.setdefault(name, threading.Lock())

    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        url = self._final.get(name)
        if url is not None:
            resp = self._get(url, start, end, follow=False)
            if resp.status_code not in _STALE_LOCATION:
                return self._ranged(resp, name, start, end)
            resp.close()
            with self._lock:
                if self._final.get(name) == url:
                    del self._final[name]
        # Lanes starting on a file at once wait for one of them to learn its location.
        with self._file_lock(name):
            url = self._final.get(name)
            if url is not None:
                return self._ranged(self._get(url, start, end, follow=False), name, start, end)
            resp = self._get(self._url(name), start, end, follow=True)
            if resp.status_code in (200, 206):
                with self._lock:
                    self._final[name] = str(resp.url)
            return self._ranged(resp, name, start, end)

    def _ranged(self, resp, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        status = resp.status_code
        if status == 200 and not (start == 0 and end == self.size(name)):
            resp.close()
            # A server that ignores Range would have us download the whole shard per tensor.
            raise GraftError("storage_error", f"{self.location}/{name}: the server ignored the Range header; "
                             "refusing to download whole files")
        if status not in (200, 206):
            resp.close()
            if status >= 500 or status == 429:
                raise TransientStorageError(f"HTTP {status}")
            code = {404: "input_not_found", 401: "storage_denied", 403: "storage_denied"}.get(status,
                                                                                             "storage_rejected")
            raise GraftError(code, f"{self.location}/{name}: HTTP {status}")
        return resp.iter_bytes(CHUNK), resp.close

    def close(self) -> None:
        super().close()
        self._http.close()


def open_store(location: Location, endpoint_url: str | None = None, *, reads: RemoteReads | None = None,
               allowed_roots: list[str] | None = None, denied_roots: list[str] | None = None,
               retry: StorageRetry | None = None) -> Store:
    """`reads`: how a remote input is read (lanes, windows; lanes.RemoteReads). `allowed_roots`/
    `denied_roots` confine a local store (see Confinement); None: unconfined."""
    if location.scheme == "file":
        return LocalStore(location, Confinement.of(allowed_roots, denied_roots))
    if location.scheme == "s3":
        return S3Store(location, endpoint_url, retry, reads)
    if location.scheme == "hf":
        return HubStore(location, retry, reads)
    raise GraftError("invalid_uri", f"unsupported location {location}")
