"""s3://: a model directory read from an S3-compatible endpoint, through lanes of ranged GETs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.lanes import RemoteReads
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.stores import CHUNK, RemoteStore
from worker.engine.storage.uris import Location


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
