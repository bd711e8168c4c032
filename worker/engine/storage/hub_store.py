"""hf://: a Hugging Face hub repository read through ranged GETs of its files, pinned to one commit."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry, TransientStorageError
from worker.engine.storage.lanes import RemoteReads
from worker.engine.storage.stores import CHUNK, RemoteStore
from worker.engine.storage.uris import Location

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
