"""s3://: an output uploaded under its final prefix, claimed first (`.graft-pending`) and a result only once
`graft-manifest.json` is in; every request retried within the budget, abort removing what was written."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from botocore.exceptions import ClientError

from worker.engine.errors import GraftError
from worker.engine.storage import trace
from worker.engine.storage.faults import StorageRetry, TransientStorageError
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.schemes.s3 import error_code
from worker.engine.storage.sinks import MANIFEST, PENDING, FileWriter, Sink
from worker.engine.storage.uris import Location

log = logging.getLogger("graft.engine")
T = TypeVar("T")


class _S3Writer(FileWriter):
    """Multipart upload as the bytes come. close() hands the last part and the completion to the sink's
    background threads, so the next shard streams while this one finishes; commit() waits for them.
    Every request goes through the sink's retry: a part stays in memory until the storage took it."""

    MIN_PART = 8 << 20
    TAIL_PART = 5 << 20  # S3's smallest part but the last
    TAIL_SPAN = 8  # the last this many part_bytes of a file go in TAIL_PART parts

    def __init__(self, sink: S3Sink, name: str, expected_size: int | None) -> None:
        super().__init__(name)
        self.sink = sink
        self.key = sink.key(name)
        sink.track_key(self.key)
        part = sink.part_bytes
        if expected_size:  # stay within S3's 10,000 parts whatever the file size
            part = max(part, -(-expected_size // 9000))
        self.part_bytes = max(part, self.MIN_PART)
        self.expected = expected_size or 0
        self.sent = 0  # bytes handed to parts so far
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future] = []

    def _next_part(self) -> int:
        # The last eight part_bytes of a file go out in parts of S3's minimum, side by side: what is left to
        # upload when the stream ends is then about one small part's time on a connection, not a whole part's
        # (the stream's last blocks come in a burst, once the last windows are in: whole parts made in it would
        # still be on their way; traced on a 5 MB/s link).
        return self.TAIL_PART if 0 < self.expected - self.sent <= self.TAIL_SPAN * self.part_bytes else self.part_bytes

    def _write(self, data) -> None:
        self.buf += data
        while len(self.buf) >= (size := self._next_part()):
            part = bytes(self.buf[:size])
            del self.buf[:size]
            self.sent += size
            self._send(part)

    def _send(self, part: bytes) -> None:
        if self.upload_id is None:
            sink = self.sink
            resp = sink.call(f"starting the upload of {self.name}", self._create)
            self.upload_id = resp["UploadId"]
            sink.track_upload(self.key, self.upload_id)
        self.parts.append(self.sink.upload_part(self.key, self.upload_id, len(self.parts) + 1, part))

    def _create(self) -> dict:
        sink = self.sink
        try:
            resp = sink.client.create_multipart_upload(Bucket=sink.bucket, Key=self.key)
        except Exception:
            sink.strays_possible = True  # it may have landed, its answer lost: an upload we hold no id of
            raise
        if resp.get("ResponseMetadata", {}).get("RetryAttempts"):
            sink.strays_possible = True  # botocore sent it again: the first may have landed too
        return resp

    def _finish(self) -> None:
        if self.upload_id is None:
            self.sink.defer(self._put_whole, bytes(self.buf))
        else:
            if self.buf or not self.parts:
                self._send(bytes(self.buf))
            self.sink.defer(self._complete, list(self.parts))
        self.buf = bytearray()

    def _put_whole(self, body: bytes) -> None:
        sink = self.sink
        sink.call(f"writing {self.name}", lambda: sink.client.put_object(Bucket=sink.bucket, Key=self.key, Body=body))

    def _complete(self, parts: list[Future]) -> None:
        done = sorted((f.result() for f in parts), key=lambda p: p["PartNumber"])
        sink, tries = self.sink, 0

        def attempt() -> None:
            nonlocal tries
            tries += 1
            try:
                sink.client.complete_multipart_upload(Bucket=sink.bucket, Key=self.key, UploadId=self.upload_id,
                                                      MultipartUpload={"Parts": done})
            except ClientError as exc:
                # An earlier try completed it and its answer was lost: the upload is gone, the object is there.
                if not (tries > 1 and error_code(exc) == "NoSuchUpload" and sink.exists_key(self.key)):
                    raise

        rec = trace.recorder()
        t_start = rec.now() if rec is not None else 0.0
        sink.call(f"completing the upload of {self.name}", attempt)
        if rec is not None:
            rec.add("complete", t_start, key=self.key, parts=len(done))
        sink.finish_upload(self.key, self.upload_id)


class S3Sink(Sink):
    """Every request goes through `retry` (faults.StorageRetry): each one here may be repeated (a part's
    bytes are still in memory; completing, aborting and deleting are idempotent; the manifest's
    conditional PUT refused because our own earlier try landed counts as done), so a storage fault is
    retried until the budget runs out. What a graft writes is known by key from the moment it opens a
    file, so abort() removes it even when a request's answer was lost."""

    def __init__(self, location: Location, *, endpoint_url: str | None = None, part_bytes: int = 8 << 20,
                 parts_in_flight: int = 16, writer: str | None = None, retry: StorageRetry | None = None,
                 manifest_name: str | None = None, split: str = "") -> None:
        self.location = location
        self.split = split
        self.manifest_name = manifest_name or MANIFEST
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.retry = retry or StorageRetry()
        parts_in_flight = max(1, parts_in_flight)
        self.part_bytes = part_bytes
        # Bytes in flight across all files: at most parts_in_flight whole parts (memory: that plus the part being
        # filled, whatever the output size); a file's small tail parts fit more at once, so that the last one
        # made is not held back behind the others. Each part in flight has a connection of its own: pooled,
        # kept open from one part to the next.
        self._parts = parts_in_flight
        self._in_flight = 0
        self._room = threading.Condition()
        lanes = parts_in_flight * -(-max(part_bytes, _S3Writer.TAIL_PART) // _S3Writer.TAIL_PART)
        self.client = s3_client(endpoint_url, self.retry.timeout, connections=lanes + 8)
        self.pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="s3-upload")
        self._finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="s3-finish")
        self._deferred: list[Future] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set when the graft ends badly: retries in flight give up
        self._uploads: dict[str, str] = {}
        self._keys: set[str] = set()  # every key this graft has written or may have
        self._manifest: bytes | None = None  # once its PUT was sent: it may have landed, answered or not
        self.strays_possible = False  # a multipart upload of ours may exist that we hold no id of
        self.writer = writer or uuid.uuid4().hex
        self._claim()

    def call(self, what: str, fn: Callable[[], T], *, stoppable: bool = True) -> T:
        return self.retry.call(f"{self.location}: {what}", fn, missing="output_not_found",
                               stop=self._stop if stoppable else None)

    def _claim(self) -> None:
        for name in dict.fromkeys((MANIFEST, self.manifest_name)):
            if self._exists(name):
                raise GraftError("output_exists", f"{self.location} already holds a committed output ({name})")
        if self.split == "join":  # a split graft's task: the claim must be its job's, and stays as it is
            if not self._exists(PENDING) or self._pending_writer() != self.writer:
                raise GraftError("output_not_found", f"{self.location}: the split graft's claim is gone (the job "
                                 "was cancelled or failed)")
            return
        if self._exists(PENDING):
            other = self._pending_writer()
            if other != self.writer:
                # Another graft claimed this prefix: it may be alive (another job or tenant), so its
                # objects are not ours to delete.
                raise GraftError("output_busy", f"{self.location} is being written by another graft ({other}); "
                                 f"if that graft is dead, delete {self.key(PENDING)} and its partial objects")
            self._clear_leftovers()  # a killed attempt of this same job
        elif self._has_objects():
            # Never empty a prefix we did not start: it may hold anything (another model, an input).
            raise GraftError("output_exists", f"{self.location} already holds objects and is not a graft's "
                             "leftovers; choose an empty prefix")
        # Claim the prefix first, so that a retry after a kill knows the leftovers are ours to clear;
        # synchronously: the claim must exist before any upload starts.
        claim = json.dumps({"writer": self.writer, "note": "a graft is being written under this prefix; it is "
                            "not a result until graft-manifest.json exists"}).encode()
        self.call("claiming the output", lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(PENDING),
                                                                        Body=claim))

    def _exists(self, name: str) -> bool:
        return self.exists_key(self.key(name))

    def exists_key(self, key: str) -> bool:
        return self.call(f"checking {key}", lambda: object_exists(self.client, self.bucket, key))

    def _pending_writer(self) -> str:
        def attempt() -> str:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(PENDING))["Body"].read()
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey"):
                    return "unknown"  # removed since we saw it: its writer finished or gave up
                raise
            try:
                return str(json.loads(body).get("writer") or "unknown")
            except (ValueError, AttributeError):
                return "unknown"

        return self.call("reading the output's claim", attempt)

    def _has_objects(self) -> bool:
        prefix = f"{self.prefix}/" if self.prefix else ""
        resp = self.call("listing the output",
                         lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1))
        return bool(resp.get("Contents"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _list_uploads(self, prefix: str) -> list[tuple[str, str]]:
        def attempt() -> list[tuple[str, str]]:  # a failed listing starts over
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            return [(up["Key"], up["UploadId"]) for page in pages for up in page.get("Uploads", [])]

        return self.call("listing unfinished uploads", attempt, stoppable=False)

    def _list_keys(self, prefix: str) -> list[str]:
        def attempt() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        return self.call("listing the output", attempt, stoppable=False)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        def attempt() -> None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if error_code(exc) != "NoSuchUpload":  # gone already is what we wanted
                    raise

        self.call(f"aborting the upload of {key}", attempt, stoppable=False)

    def _delete_keys(self, keys: list[str]) -> None:
        delete_keys(self.client, self.bucket, keys, self.retry, str(self.location))

    def _clear_leftovers(self) -> None:
        """A retried job finds what a killed attempt left (it left PENDING too): stale uploads and objects.
        PENDING itself stays: the claim is this job's, and it is rewritten right after."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        for key, upload_id in self._list_uploads(prefix):
            self._abort_upload(key, upload_id)
        self._delete_keys([k for k in self._list_keys(prefix) if k != self.key(PENDING)])

    def track_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads[key] = upload_id

    def finish_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(key, None)

    def track_key(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        return _S3Writer(self, name, expected_size)

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> Future:
        rec = trace.recorder()
        t_ready = rec.now() if rec is not None else 0.0
        size = len(body)
        with self._room:  # a part larger than the room still goes, alone
            while self._in_flight and self._in_flight + size > self._parts * max(self.part_bytes, size):
                self._room.wait()
            self._in_flight += size
        t_slot = rec.now() if rec is not None else 0.0

        def send() -> dict:
            t_start = rec.now() if rec is not None else 0.0
            try:
                resp = self.call(f"uploading part {number} of {key}", lambda: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
                if rec is not None:  # ready: the part's bytes were there; slot: a part in flight ended for it
                    rec.add("part", t_start, key=key, number=number, bytes=len(body), ready=round(t_ready, 4),
                            slot=round(t_slot, 4))
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                with self._room:
                    self._in_flight -= size
                    self._room.notify_all()

        return self.pool.submit(send)

    def defer(self, fn, *args) -> None:
        with self._lock:
            self._deferred.append(self._finisher.submit(fn, *args))

    def _wait_deferred(self) -> None:
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for future in deferred:
            try:
                future.result()
            except GraftError:
                raise
            except Exception as exc:
                raise GraftError("storage_error", f"{self.location}: upload failed: {exc}") from exc

    def staged(self) -> Location:
        self._wait_deferred()  # side files and shard completions run on the finisher threads
        return self.location

    def commit(self, manifest: bytes) -> str:
        self._wait_deferred()
        key = self.key(self.manifest_name)
        try:
            self._abort_strays()
            if self.split == "join":
                self._abort_killed_uploads()
            self._manifest = manifest
            rec = trace.recorder()
            t_start = rec.now() if rec is not None else 0.0
            self.call("writing the manifest", lambda: self._put_manifest(key, manifest), stoppable=False)
            if rec is not None:
                rec.add("manifest", t_start, key=key, bytes=len(manifest))
        finally:
            self.pool.shutdown(wait=True)
            self._finisher.shutdown(wait=True)
        try:
            self.call("removing the output's claim",
                      lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(PENDING)), stoppable=False)
        except GraftError as exc:  # harmless: readers trust the manifest, and a later graft here is refused anyway
            log.warning("%s", exc.message)
        return f"s3://{self.bucket}/{key}"

    def _abort_killed_uploads(self) -> None:
        """Every file is complete by now; an upload still open under the claimed prefix is a killed task's (its
        retry uploaded the whole file). Best effort, one listing, not retried: an unfinished upload is no object
        (readers never see it), some S3-compatible servers cannot list them (s3rver), and a bucket's lifecycle
        rule aborting incomplete uploads is the backstop."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            found = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]
        except Exception as exc:
            log.warning("%s: unfinished uploads not listed (%s); a lifecycle rule removes a killed task's",
                        self.location, exc)
            return
        for key, upload_id in found:
            self._abort_upload(key, upload_id)

    def _abort_strays(self) -> None:
        """Every upload of ours is complete by now; one still open on a key of ours was created by a request
        whose answer never came (a timeout, a reset) and that landed all the same: abort it. Only looked for
        when such a request was seen, so that a graft's end is its last parts, completions and manifest."""
        with self._lock:
            keys = set(self._keys)
        if keys and self.strays_possible:
            prefix = f"{self.prefix}/" if self.prefix else ""
            for key, upload_id in self._list_uploads(prefix):
                if key in keys:
                    self._abort_upload(key, upload_id)

    def _put_manifest(self, key: str, manifest: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=manifest, IfNoneMatch="*")
        except ClientError as exc:
            code = error_code(exc)
            if code in ("ConditionalRequestConflict", "409"):  # a conditional write in progress: ask again
                raise TransientStorageError(str(exc)) from exc
            if code not in ("PreconditionFailed", "412"):
                raise
            # A refusal of our own PUT's retry (the first landed, its answer was lost) is a success.
            if not self._manifest_is(manifest):
                raise GraftError("output_exists", f"{self.location} was committed by someone else") from exc

    def _manifest_is(self, manifest: bytes, retried: bool = False) -> bool:
        def attempt() -> bool:
            try:
                key = self.key(self.manifest_name)
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read() == manifest
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey"):
                    return False
                raise

        # Inside _put_manifest it is one try of the caller's retried call; on its own, retried like the rest.
        return self.call("reading the manifest", attempt, stoppable=False) if retried else attempt()

    def abandon(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=False, cancel_futures=True)

    def detach(self) -> None:
        self._wait_deferred()
        self.abandon()

    def abort(self) -> None:
        """Remove what this graft wrote. If the storage stays down past the budget, this raises at the first
        request that gives up, leaving the claim in place: a retry of the same job (same writer) clears the
        rest when it starts."""
        # Retries in flight give up now; let them settle, so that nothing they complete escapes the clean-up.
        self._stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._finisher.shutdown(wait=True, cancel_futures=True)
        if self._manifest is not None and self._manifest_is(self._manifest, retried=True):
            # Our manifest PUT landed though no answer said so: it goes first, or it would name deleted files.
            self._delete_keys([self.key(self.manifest_name)])
        with self._lock:
            uploads, keys = set(self._uploads.items()), set(self._keys)
        if keys:
            # An upload whose creation answered with an error may exist all the same: find ours by key.
            prefix = f"{self.prefix}/" if self.prefix else ""
            uploads |= {(key, upload_id) for key, upload_id in self._list_uploads(prefix) if key in keys}
        for key, upload_id in sorted(uploads):
            self._abort_upload(key, upload_id)
        if self.split == "join":
            # A split graft's task: its completed files may be a duplicate's too, and the claim is the job's;
            # what the job leaves goes when the job is discarded (pipeline/shards.py discard_split).
            return
        self._delete_keys(sorted(keys))
        # The claim goes last: while anything of ours may remain, it tells a retry that it may clear it.
        self._delete_keys([self.key(PENDING)])


def delete_keys(client, bucket: str, keys: list[str], retry: StorageRetry, where: str) -> None:
    """Delete `keys` of `bucket`, at most 1000 a request (S3's most), each request retried within `retry`'s
    budget (deleting is idempotent: a key already gone is no error)."""
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]

        def attempt(batch: list[dict] = batch) -> None:
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                raise TransientStorageError(f"{len(errors)} of {len(batch)} deletions failed, the first "
                                            f"{errors[0].get('Key')}: {errors[0].get('Code')}")

        retry.call(f"{where}: deleting {len(batch)} object(s)", attempt, missing="output_not_found")


def object_exists(client, bucket: str, key: str) -> bool:
    """One HEAD of `key`. Any failure but "not found" raises, for the caller to retry or report."""
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
