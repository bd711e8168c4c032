"""Read access to a model directory wherever it lives: whole small files and ranged reads of big ones.

Every store is safe to call from several threads at once: the reader issues ranged reads from a pool.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import GraftError
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


class LocalStore(Store):
    def __init__(self, location: Location) -> None:
        self.location = location
        self.root = location.path
        if not os.path.isdir(self.root):
            raise GraftError("input_not_found", f"{location}: not a directory")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def list_files(self) -> dict[str, int]:
        out = {}
        for entry in os.scandir(self.root):
            if entry.is_file():
                out[entry.name] = entry.stat().st_size
        return out

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    self.size(name)
                    fd = self._fds[name] = os.open(os.path.join(self.root, name), os.O_RDONLY)
        return fd

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        fd = self._fd(name)
        length = len(view)
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], start + got)
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


def _fill(view: memoryview, chunks) -> int:
    """Copy a response's chunks into `view`; returns the byte count, which exceeds len(view) on overrun."""
    got = 0
    for chunk in chunks:
        if got + len(chunk) > len(view):
            return got + len(chunk)
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return got


class RemoteStore(Store):
    """Stores reached over HTTP: they report the checksums the server keeps instead of hashing, and serve
    the stream from large aligned windows fetched ahead of need. A request has a fixed cost (and some
    S3-compatible servers, moto among them, pay for the whole object on every ranged GET), so a few
    large reads beat one per block; memory stays at `windows` x `window_bytes` per store."""

    _meta: dict[str, dict]
    window_bytes: int = 32 << 20
    windows: int = 4

    def configure_windows(self, window_bytes: int | None, windows: int | None) -> None:
        self.window_bytes = window_bytes or self.window_bytes
        self.windows = max(2, windows or self.windows)

    def _init_windows(self) -> None:
        self._cache: OrderedDict[tuple[str, int], Future] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="graft-window")

    def _window(self, name: str, index: int) -> Future:
        with self._cache_lock:
            key = (name, index)
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._fetcher.submit(self._load_window, name, index)
            self._cache[key] = future
            while len(self._cache) > self.windows:  # a reader still waiting on an evicted one keeps it alive
                self._cache.popitem(last=False)
            return future

    def _load_window(self, name: str, index: int) -> bytearray:
        start = index * self.window_bytes
        buf = bytearray(min(self.window_bytes, self.size(name) - start))
        self.read_into(name, start, memoryview(buf))
        return buf

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
        following = -(-end // width)
        if following * width < size:
            self._window(name, following)  # read ahead; not waited for

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        with self._cache_lock:
            self._cache.clear()

    def fingerprint(self, name: str) -> dict:
        return {"size": self.size(name), **self._meta.get(name, {})}

    def _check_length(self, name: str, start: int, length: int, got: int) -> None:
        if got != length:
            raise GraftError("invalid_safetensors",
                             f"{self.location}/{name}: expected {length} bytes at {start}, the server sent {got}")


class S3Store(RemoteStore):
    def __init__(self, location: Location, endpoint_url: str | None = None) -> None:
        self.location = location
        self._init_windows()
        self.client = s3_client(endpoint_url)
        self._meta: dict[str, dict] = {}

    def _key(self, name: str) -> str:
        return f"{self.location.prefix}/{name}" if self.location.prefix else name

    def list_files(self) -> dict[str, int]:
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        out: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name:
                        out[name] = obj["Size"]
                        self._meta[name] = {"etag": obj.get("ETag", "").strip('"')}
        except Exception as exc:  # botocore raises many types; all mean the same to a user
            raise GraftError("storage_error", f"{self.location}: cannot list: {exc}") from exc
        if not out:
            raise GraftError("input_not_found", f"{self.location}: no objects under this prefix")
        return out

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        length = len(view)
        if length == 0:
            return
        self.size(name)
        try:
            resp = self.client.get_object(
                Bucket=self.location.bucket, Key=self._key(name), Range=f"bytes={start}-{start + length - 1}"
            )
            got = _fill(view, resp["Body"].iter_chunks(8 << 20))
        except Exception as exc:
            raise GraftError("storage_error", f"{self.location}/{name}: ranged read failed: {exc}") from exc
        self._check_length(name, start, length, got)


class HubStore(RemoteStore):
    """A Hugging Face hub repository, pinned to the commit its revision resolves to."""

    def __init__(self, location: Location) -> None:
        import httpx
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import build_hf_headers

        self.location = location
        self._init_windows()
        self.endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        try:
            info = HfApi(endpoint=self.endpoint).model_info(
                location.repo, revision=location.revision, files_metadata=True
            )
        except Exception as exc:
            raise GraftError("input_not_found", f"{location}: cannot resolve on the hub: {exc}") from exc
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
        self._http = httpx.Client(headers=build_hf_headers(), follow_redirects=True, timeout=120.0)

    def list_files(self) -> dict[str, int]:
        return self._files

    def _url(self, name: str) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.location.repo}/resolve/{self.revision}/{name}"

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        length = len(view)
        if length == 0:
            return
        self.size(name)
        whole = start == 0 and length == self.size(name)
        try:
            with self._http.stream("GET", self._url(name),
                                   headers={"Range": f"bytes={start}-{start + length - 1}"}) as resp:
                if resp.status_code == 200 and not whole:
                    # A server that ignores Range would have us download the whole shard per tensor.
                    raise GraftError("storage_error", f"{self.location}/{name}: the server ignored the Range "
                                     "header; refusing to download whole files")
                if resp.status_code not in (200, 206):
                    raise GraftError("storage_error", f"{self.location}/{name}: HTTP {resp.status_code}")
                got = _fill(view, resp.iter_bytes(1 << 20))
        except GraftError:
            raise
        except Exception as exc:
            raise GraftError("storage_error", f"{self.location}/{name}: ranged read failed: {exc}") from exc
        self._check_length(name, start, length, got)

    def close(self) -> None:
        super().close()
        self._http.close()


def open_store(location: Location, endpoint_url: str | None = None, *, window_bytes: int | None = None,
               windows: int | None = None) -> Store:
    if location.scheme == "file":
        return LocalStore(location)
    if location.scheme == "s3":
        store: RemoteStore = S3Store(location, endpoint_url)
    elif location.scheme == "hf":
        store = HubStore(location)
    else:
        raise GraftError("invalid_uri", f"unsupported location {location}")
    store.configure_windows(window_bytes, windows)
    return store
