"""Write side: an output directory or prefix that only becomes a result when committed.

Files are streamed (sha256 computed on the way); the manifest goes last. Local outputs are built in a
hidden sibling directory and renamed into place; S3 outputs are uploaded under the final prefix, and a
prefix without `graft-manifest.json` is not a result. Abort removes whatever was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import ClientError

from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry, TransientStorageError, error_code
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.stores import Confinement, fd_path
from worker.engine.storage.uris import Location

MANIFEST = "graft-manifest.json"
OWNER = ".graft-owner"  # in a local temp output: "host pid" of the process writing it
PENDING = ".graft-pending"  # S3: marks a prefix a graft is writing (removed once the manifest is in)
STAGING = ".graft-tmp-"  # a local output is built in `.<name>.graft-tmp-<hex>` beside it, then renamed

log = logging.getLogger("graft.engine")
T = TypeVar("T")


@dataclass
class FileRecord:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class FileWriter(ABC):
    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, data) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._write(data)

    @abstractmethod
    def _write(self, data) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    def close(self) -> FileRecord:
        self._finish()
        return FileRecord(self.name, self.size, self._sha.hexdigest())

    def abort(self) -> None:  # noqa: B027 - optional hook
        pass


class Sink(ABC):
    location: Location

    @abstractmethod
    def open(self, name: str, expected_size: int | None = None) -> FileWriter: ...

    def put(self, name: str, data: bytes) -> FileRecord:
        writer = self.open(name, len(data))
        writer.write(data)
        return writer.close()

    @abstractmethod
    def commit(self, manifest: bytes) -> str:
        """Publish: the manifest is written last; returns the manifest's URI."""

    @abstractmethod
    def abort(self) -> None: ...

    @abstractmethod
    def abandon(self) -> None:
        """Stop writing without removing anything: another writer owns the output now."""

    def staged(self) -> Location:
        """Where what has been written so far can be read back before the commit (an evaluation of the output
        reads it there): every file put or closed is complete there; no manifest yet."""
        return self.location


class _LocalWriter(FileWriter):
    def __init__(self, name: str, dir_fd: int, expected_size: int | None, io: ThreadPoolExecutor) -> None:
        super().__init__(name)
        self._fd = _create(name, dir_fd)
        self._io = io
        if expected_size:
            try:  # one extent up front: block allocation while streaming costs more than the copy
                os.posix_fallocate(self._fd, 0, expected_size)
            except OSError:
                pass

    def write(self, data) -> None:
        # The write goes to the I/O thread while this thread hashes the same bytes.
        pending = self._io.submit(self._write, data) if len(data) >= (1 << 20) else None
        self._sha.update(data)
        self.size += len(data)
        if pending is None:
            self._write(data)
        else:
            pending.result()

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _finish(self) -> None:
        os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def remove_orphans(parent: str, prefix: str) -> None:
    """Remove what killed grafts to this output left: temp directories whose writer process is gone.
    Only this host's are judged; a live writer's directory is never touched."""
    host = socket.gethostname()
    for entry in os.scandir(parent):
        if not (entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, OWNER)) as fh:
                owner_host, pid = fh.read().split()
            if owner_host != host:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _create(name: str, dir_fd: int) -> int:
    """A new file in the directory `dir_fd` holds. O_EXCL | O_NOFOLLOW: whatever someone planted under
    that name (a symlink out of the allowed roots, a file) is refused, never followed or overwritten."""
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                       dir_fd=dir_fd)
    except OSError as exc:
        raise GraftError("storage_error", f"cannot create {name} in the output: {exc.strerror}") from None


def _real_ancestor(path: str) -> str:
    """realpath of the deepest existing ancestor joined with the rest (an output need not exist yet)."""
    head, tail = path, []
    while not os.path.lexists(head) and head not in ("/", ""):
        head, name = os.path.split(head)
        tail.append(name)
    return os.path.join(os.path.realpath(head), *reversed(tail))


class LocalSink(Sink):
    """The output is built in a hidden sibling directory, reached through descriptors (of the parent and
    of the temp directory) opened once: confined, the parent is checked on its descriptor, and no later
    swap of a path component for a symlink can move where the files land."""

    def __init__(self, location: Location, confinement: Confinement | None = None) -> None:
        self.location = location
        self.final = location.path
        try:
            occupied = os.path.exists(self.final) and (not os.path.isdir(self.final) or bool(os.listdir(self.final)))
        except OSError as exc:
            raise GraftError("storage_error", f"{location}: cannot inspect the output: {exc.strerror}") from None
        if occupied:
            raise GraftError("output_exists", f"{location} already exists and is not an empty directory")
        parent = os.path.dirname(self.final) or "."
        if confinement is not None and not confinement.admits(_real_ancestor(parent)):
            raise self._escape()  # before makedirs creates anything out there
        prefix = f".{os.path.basename(self.final)}{STAGING}"
        self._tmp_name = prefix + uuid.uuid4().hex[:12]
        self.tmp = os.path.join(parent, self._tmp_name)
        self._parent_fd = self._dir_fd = -1
        try:
            os.makedirs(parent, exist_ok=True)
            self._parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if confinement is not None and not confinement.admits(fd_path(self._parent_fd, parent)):
                raise self._escape()
            remove_orphans(parent, prefix)
            os.mkdir(self._tmp_name, 0o755, dir_fd=self._parent_fd)
            self._dir_fd = os.open(self._tmp_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=self._parent_fd)
            fd = _create(OWNER, self._dir_fd)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise GraftError("storage_error", f"{location}: cannot create the output: {exc.strerror}") from None
            raise
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-write")

    def staged(self) -> Location:
        return Location("file", path=self.tmp)  # each write returns once it has landed

    def _escape(self) -> GraftError:
        return GraftError("uri_not_allowed", f"{self.location}: the output's directory resolves outside the "
                          "allowed roots")

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        return _LocalWriter(name, self._dir_fd, expected_size, self._io)

    def commit(self, manifest: bytes) -> str:
        self.put(MANIFEST, manifest)
        self._io.shutdown(wait=True)
        final_name = os.path.basename(self.final)
        try:
            os.unlink(OWNER, dir_fd=self._dir_fd)
            try:
                os.rmdir(final_name, dir_fd=self._parent_fd)  # empty at the check in __init__; filled since, refused
            except FileNotFoundError:
                pass
            os.rename(self._tmp_name, final_name, src_dir_fd=self._parent_fd, dst_dir_fd=self._parent_fd)
        except OSError as exc:
            raise GraftError("output_exists", f"{self.location}: cannot publish the output: {exc}") from exc
        self._close_fds()
        return f"file://{os.path.join(self.final, MANIFEST)}"

    def _close_fds(self) -> None:
        for fd in (self._dir_fd, self._parent_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._parent_fd = -1

    def _discard(self) -> None:
        if self._parent_fd >= 0:
            shutil.rmtree(self._tmp_name, ignore_errors=True, dir_fd=self._parent_fd)
        self._close_fds()

    def abort(self) -> None:
        self._io.shutdown(wait=True)
        self._discard()

    def abandon(self) -> None:
        self.abort()  # the temp directory is this writer's own, whoever publishes the output


class _S3Writer(FileWriter):
    """Multipart upload as the bytes come. close() hands the last part and the completion to the sink's
    background threads, so the next shard streams while this one finishes; commit() waits for them.
    Every request goes through the sink's retry: a part stays in memory until the storage took it."""

    MIN_PART = 8 << 20
    TAIL_PART = 5 << 20  # S3's smallest part but the last

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
        # The last part_bytes of a file go out in parts of S3's minimum, side by side: what is left to upload
        # when the stream ends is then one small part's time on a connection, not a whole part's.
        return self.TAIL_PART if 0 < self.expected - self.sent <= self.part_bytes else self.part_bytes

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

        sink.call(f"completing the upload of {self.name}", attempt)
        sink.finish_upload(self.key, self.upload_id)


class S3Sink(Sink):
    """Every request goes through `retry` (faults.StorageRetry): each one here may be repeated (a part's
    bytes are still in memory; completing, aborting and deleting are idempotent; the manifest's
    conditional PUT refused because our own earlier try landed counts as done), so a storage fault is
    retried until the budget runs out. What a graft writes is known by key from the moment it opens a
    file, so abort() removes it even when a request's answer was lost."""

    def __init__(self, location: Location, *, endpoint_url: str | None = None, part_bytes: int = 16 << 20,
                 parts_in_flight: int = 8, writer: str | None = None, retry: StorageRetry | None = None) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.retry = retry or StorageRetry()
        parts_in_flight = max(1, parts_in_flight)
        # Each part in flight has a connection of its own: pooled, kept open from one part to the next.
        self.client = s3_client(endpoint_url, self.retry.timeout, connections=parts_in_flight + 8)
        self.part_bytes = part_bytes
        # Parts in flight across all files: memory is part_bytes times this (plus the part being filled),
        # whatever the output size; the storage takes as many parts at once as it has connections for.
        self._slots = threading.BoundedSemaphore(parts_in_flight)
        self.pool = ThreadPoolExecutor(max_workers=parts_in_flight, thread_name_prefix="s3-upload")
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
        if self._exists(MANIFEST):
            raise GraftError("output_exists", f"{self.location} already holds a committed graft")
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
        for i in range(0, len(keys), 1000):  # S3's most per request
            batch = [{"Key": k} for k in keys[i:i + 1000]]

            def attempt(batch: list[dict] = batch) -> None:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                errors = resp.get("Errors") or []
                if errors:
                    raise TransientStorageError(f"{len(errors)} of {len(batch)} deletions failed, the first "
                                                f"{errors[0].get('Key')}: {errors[0].get('Code')}")

            self.call(f"deleting {len(batch)} object(s)", attempt, stoppable=False)

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
        self._slots.acquire()

        def send() -> dict:
            try:
                resp = self.call(f"uploading part {number} of {key}", lambda: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                self._slots.release()

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
        key = self.key(MANIFEST)
        try:
            self._abort_strays()
            self._manifest = manifest
            self.call("writing the manifest", lambda: self._put_manifest(key, manifest), stoppable=False)
        finally:
            self.pool.shutdown(wait=True)
            self._finisher.shutdown(wait=True)
        try:
            self.call("removing the output's claim",
                      lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(PENDING)), stoppable=False)
        except GraftError as exc:  # harmless: readers trust the manifest, and a later graft here is refused anyway
            log.warning("%s", exc.message)
        return f"s3://{self.bucket}/{key}"

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
                return self.client.get_object(Bucket=self.bucket, Key=self.key(MANIFEST))["Body"].read() == manifest
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
            self._delete_keys([self.key(MANIFEST)])
        with self._lock:
            uploads, keys = set(self._uploads.items()), set(self._keys)
        if keys:
            # An upload whose creation answered with an error may exist all the same: find ours by key.
            prefix = f"{self.prefix}/" if self.prefix else ""
            uploads |= {(key, upload_id) for key, upload_id in self._list_uploads(prefix) if key in keys}
        for key, upload_id in sorted(uploads):
            self._abort_upload(key, upload_id)
        self._delete_keys(sorted(keys))
        # The claim goes last: while anything of ours may remain, it tells a retry that it may clear it.
        self._delete_keys([self.key(PENDING)])


def object_exists(client, bucket: str, key: str) -> bool:
    """One HEAD of `key`. Any failure but "not found" raises, for the caller to retry or report."""
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def open_sink(location: Location, *, endpoint_url: str | None = None, part_bytes: int = 16 << 20,
              parts_in_flight: int = 8, writer: str | None = None, allowed_roots: list[str] | None = None,
              denied_roots: list[str] | None = None, retry: StorageRetry | None = None) -> Sink:
    """`allowed_roots`/`denied_roots` confine a local output (see stores.Confinement); None: unconfined.
    `part_bytes`, `parts_in_flight`: an S3 output's multipart uploads."""
    if location.scheme == "file":
        return LocalSink(location, Confinement.of(allowed_roots, denied_roots))
    if location.scheme == "s3":
        return S3Sink(location, endpoint_url=endpoint_url, part_bytes=part_bytes, parts_in_flight=parts_in_flight,
                      writer=writer, retry=retry)
    raise GraftError("invalid_uri", f"{location}: outputs go to a local directory or s3://")
