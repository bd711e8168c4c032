"""Read access to a model directory wherever it lives: whole small files and ranged reads of big ones.

Every store is safe to call from several threads at once: the reader issues ranged reads from a pool.
"""

from __future__ import annotations

import os
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import GraftError
from .faults import StorageRetry, TransientStorageError
from .s3 import s3_client
from .uris import Location

SMALL_FILE_CAP = 64 << 20  # config/tokenizer files larger than this are refused


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


class _Body:
    """An open ranged response read front to back in exact amounts."""

    def __init__(self, chunks: Iterator[bytes], close: Callable[[], None], position: int, end: int) -> None:
        self.chunks, self.close, self.position, self.end = chunks, close, position, end
        self.rest = memoryview(b"")

    def read_into(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            if not self.rest:
                chunk = next(self.chunks, b"")
                if not chunk:
                    break
                self.rest = memoryview(chunk)
            n = min(len(self.rest), len(view) - got)
            view[got:got + n] = self.rest[:n]
            self.rest = self.rest[n:]
            got += n
        self.position += got
        return got


class RemoteStore(Store):
    """Stores reached over HTTP: they report the checksums the server keeps instead of hashing, and serve
    the stream from aligned windows fetched ahead of need, one window after another from a ranged
    response that spans several windows. A request has a fixed cost (and some S3-compatible servers,
    moto among them, pay for the whole object on every ranged GET), so few long responses beat one
    request per block; memory stays at `windows` x `window_bytes` per store, whatever the span.

    Every read goes through `retry` (faults.StorageRetry): a ranged read is idempotent, so a storage fault
    (a reset, a timeout, a 5xx, a response cut short) reopens the range where it started, until the
    budget runs out; a refusal of the request (404, 403) fails at once with its own code."""

    _meta: dict[str, dict]
    window_bytes: int = 32 << 20
    windows: int = 4
    span_windows: int = 8
    retry: StorageRetry = StorageRetry()

    def configure_windows(self, window_bytes: int | None, windows: int | None,
                          span_windows: int | None = None) -> None:
        self.window_bytes = window_bytes or self.window_bytes
        self.windows = max(2, windows or self.windows)
        self.span_windows = max(1, span_windows or self.span_windows)

    def _init_windows(self) -> None:
        self._cache: OrderedDict[tuple[str, int], Future] = OrderedDict()
        self._cache_lock = threading.Lock()
        # One fetcher: windows of a file load in the order asked, so one response serves them in turn.
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-window")
        self._bodies: dict[str, _Body] = {}
        self._last_window: dict[str, int] = {}
        self._closing = threading.Event()  # retries in flight give up: nobody waits for their bytes any more

    @abstractmethod
    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        """A response streaming bytes [start, end) of the file, and how to close it."""

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        if not len(view):
            return
        self.size(name)
        end = start + len(view)

        def attempt() -> None:
            chunks, close = self._open(name, start, end)
            try:
                got = _Body(chunks, close, start, end).read_into(view)
            finally:
                close()
            self._check_length(start, len(view), got)

        self.retry.call(f"{self.location}/{name}: reading bytes {start}-{end - 1}", attempt, stop=self._closing)

    def _window(self, name: str, index: int) -> Future:
        with self._cache_lock:
            key = (name, index)
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._fetcher.submit(self._load_window, name, index)
            self._cache[key] = future
            while len(self._cache) > self.windows:
                # Drop the window farthest from where its file is being read (several files of one input
                # are often read side by side); the least recently used among equals. A reader still
                # waiting on a dropped window keeps it alive.
                def distance(k: tuple[str, int]) -> int:
                    return abs(k[1] - self._last_window.get(k[0], k[1]))

                victim = max(self._cache, key=distance)
                if distance(victim) <= 1:
                    victim = next(iter(self._cache))
                del self._cache[victim]
            return future

    def _load_window(self, name: str, index: int) -> bytearray:
        size = self.size(name)
        start = index * self.window_bytes
        buf = bytearray(min(self.window_bytes, size - start))
        view = memoryview(buf)

        def attempt() -> bytearray:
            body = self._bodies.get(name)
            if body is None or body.position != start or body.end < start + len(buf):
                self._drop_body(name)
                end = min(size, start + self.span_windows * self.window_bytes)
                body = self._bodies[name] = _Body(*self._open(name, start, end), start, end)
            try:
                got = body.read_into(view)
                self._check_length(start, len(buf), got)
            except BaseException:  # a dropped idle connection, a cut response: the next try reopens here
                self._drop_body(name)
                raise
            return buf

        return self.retry.call(f"{self.location}/{name}: reading bytes {start}-{start + len(buf) - 1}", attempt,
                               stop=self._closing)

    def _drop_body(self, name: str) -> None:
        body = self._bodies.pop(name, None)
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection may fail in its own way; it is gone either way
                pass

    def stream_into(self, name: str, start: int, view: memoryview) -> None:
        size, width = self.size(name), self.window_bytes
        end = start + len(view)
        if end > size:
            raise GraftError("invalid_safetensors", f"{self.location}/{name}: read past the end of the file")
        pos = start
        while pos < end:
            index = pos // width
            window = self._window(name, index).result()
            offset = pos - index * width
            n = min(end - pos, len(window) - offset)
            view[pos - start:pos - start + n] = window[offset:offset + n]
            pos += n
        # Read ahead in the direction the file is being walked (a target saved in another order than the
        # sources has them read back to front); not waited for.
        first, last = start // width, (end - 1) // width
        backwards = self._last_window.get(name, -1) > last
        self._last_window[name] = last
        ahead = first - 1 if backwards else last + 1
        if ahead >= 0 and ahead * width < size:
            self._window(name, ahead)

    def close(self) -> None:
        self._closing.set()
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        for name in list(self._bodies):
            self._drop_body(name)
        with self._cache_lock:
            self._cache.clear()

    def fingerprint(self, name: str) -> dict:
        return {"size": self.size(name), **self._meta.get(name, {})}

    @staticmethod
    def _check_length(start: int, length: int, got: int) -> None:
        if got != length:
            # The listing said the bytes are there: a response cut short is the connection's fault.
            raise TransientStorageError(f"expected {length} bytes at {start}, the server sent {got}")


class S3Store(RemoteStore):
    def __init__(self, location: Location, endpoint_url: str | None = None,
                 retry: StorageRetry | None = None) -> None:
        self.location = location
        self.retry = retry or StorageRetry()
        self._init_windows()
        self.client = s3_client(endpoint_url, self.retry.timeout)
        self._meta: dict[str, dict] = {}

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
        return body.iter_chunks(1 << 20), body.close


class HubStore(RemoteStore):
    """A Hugging Face hub repository, pinned to the commit its revision resolves to."""

    def __init__(self, location: Location, retry: StorageRetry | None = None) -> None:
        import httpx
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        self.location = location
        self.retry = retry or StorageRetry()
        self._init_windows()
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
        self._http = httpx.Client(headers=build_hf_headers(), follow_redirects=True, timeout=self.retry.timeout)

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

    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        # identity: a compressed ranged response would not be the file's bytes.
        request = self._http.build_request("GET", self._url(name), headers={
            "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        resp = self._http.send(request, stream=True)
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
        return resp.iter_bytes(1 << 20), resp.close

    def close(self) -> None:
        super().close()
        self._http.close()


def open_store(location: Location, endpoint_url: str | None = None, *, window_bytes: int | None = None,
               windows: int | None = None, span_windows: int | None = None,
               allowed_roots: list[str] | None = None, denied_roots: list[str] | None = None,
               retry: StorageRetry | None = None) -> Store:
    """`allowed_roots`/`denied_roots` confine a local store (see Confinement); None: unconfined."""
    if location.scheme == "file":
        return LocalStore(location, Confinement.of(allowed_roots, denied_roots))
    if location.scheme == "s3":
        store: RemoteStore = S3Store(location, endpoint_url, retry)
    elif location.scheme == "hf":
        store = HubStore(location, retry)
    else:
        raise GraftError("invalid_uri", f"unsupported location {location}")
    store.configure_windows(window_bytes, windows, span_windows)
    return store
