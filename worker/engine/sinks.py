"""Write side: an output directory or prefix that only becomes a result when committed.

Files are streamed (sha256 computed on the way); the manifest goes last. Local outputs are built in a
hidden sibling directory and renamed into place; S3 outputs are uploaded under the final prefix, and a
prefix without `graft-manifest.json` is not a result. Abort removes whatever was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .errors import GraftError
from .s3 import s3_client
from .uris import Location

MANIFEST = "graft-manifest.json"
OWNER = ".graft-owner"  # in a local temp output: "host pid" of the process writing it
PENDING = ".graft-pending"  # S3: marks a prefix a graft is writing (removed once the manifest is in)


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


class _LocalWriter(FileWriter):
    def __init__(self, name: str, path: str, expected_size: int | None, io: ThreadPoolExecutor) -> None:
        super().__init__(name)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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


def _remove_orphans(parent: str, prefix: str) -> None:
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


class LocalSink(Sink):
    def __init__(self, location: Location) -> None:
        self.location = location
        self.final = location.path
        if os.path.exists(self.final) and (not os.path.isdir(self.final) or os.listdir(self.final)):
            raise GraftError("output_exists", f"{location} already exists and is not an empty directory")
        parent = os.path.dirname(self.final) or "."
        os.makedirs(parent, exist_ok=True)
        prefix = f".{os.path.basename(self.final)}.graft-tmp-"
        _remove_orphans(parent, prefix)
        self.tmp = os.path.join(parent, prefix + uuid.uuid4().hex[:12])
        os.makedirs(self.tmp)
        with open(os.path.join(self.tmp, OWNER), "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-write")

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        return _LocalWriter(name, os.path.join(self.tmp, name), expected_size, self._io)

    def commit(self, manifest: bytes) -> str:
        self.put(MANIFEST, manifest)
        self._io.shutdown(wait=True)
        os.unlink(os.path.join(self.tmp, OWNER))
        try:
            if os.path.isdir(self.final):
                os.rmdir(self.final)  # empty at the check in __init__; filled since, rmdir refuses
            os.rename(self.tmp, self.final)
        except OSError as exc:
            raise GraftError("output_exists", f"{self.location}: cannot publish the output: {exc}") from exc
        return f"file://{os.path.join(self.final, MANIFEST)}"

    def abort(self) -> None:
        self._io.shutdown(wait=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abandon(self) -> None:
        self.abort()  # the temp directory is this writer's own, whoever publishes the output


class _S3Writer(FileWriter):
    """Multipart upload as the bytes come. close() hands the last part and the completion to the sink's
    background threads, so the next shard streams while this one finishes; commit() waits for them."""

    MIN_PART = 8 << 20

    def __init__(self, sink: S3Sink, name: str, expected_size: int | None) -> None:
        super().__init__(name)
        self.sink = sink
        self.key = sink.key(name)
        part = sink.part_bytes
        if expected_size:  # stay within S3's 10,000 parts whatever the file size
            part = max(part, -(-expected_size // 9000))
        self.part_bytes = max(part, self.MIN_PART)
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future] = []

    def _write(self, data) -> None:
        self.buf += data
        while len(self.buf) >= self.part_bytes:
            part = bytes(self.buf[:self.part_bytes])
            del self.buf[:self.part_bytes]
            self._send(part)

    def _send(self, part: bytes) -> None:
        if self.upload_id is None:
            resp = self.sink.client.create_multipart_upload(Bucket=self.sink.bucket, Key=self.key)
            self.upload_id = resp["UploadId"]
            self.sink.track_upload(self.key, self.upload_id)
        self.parts.append(self.sink.upload_part(self.key, self.upload_id, len(self.parts) + 1, part))

    def _finish(self) -> None:
        if self.upload_id is None:
            self.sink.defer(self._put_whole, bytes(self.buf))
        else:
            if self.buf or not self.parts:
                self._send(bytes(self.buf))
            self.sink.defer(self._complete, list(self.parts))
        self.buf = bytearray()

    def _put_whole(self, body: bytes) -> None:
        self.sink.client.put_object(Bucket=self.sink.bucket, Key=self.key, Body=body)
        self.sink.track_object(self.key)

    def _complete(self, parts: list[Future]) -> None:
        done = sorted((f.result() for f in parts), key=lambda p: p["PartNumber"])
        self.sink.client.complete_multipart_upload(Bucket=self.sink.bucket, Key=self.key, UploadId=self.upload_id,
                                                   MultipartUpload={"Parts": done})
        self.sink.finish_upload(self.key, self.upload_id)


class S3Sink(Sink):
    def __init__(self, location: Location, *, endpoint_url: str | None = None, part_bytes: int = 32 << 20,
                 parts_in_flight: int = 4, writer: str | None = None) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.client = s3_client(endpoint_url)
        self.part_bytes = part_bytes
        # Parts in flight across all files: memory is part_bytes times this, whatever the output size.
        self._slots = threading.BoundedSemaphore(parts_in_flight)
        self.pool = ThreadPoolExecutor(max_workers=parts_in_flight, thread_name_prefix="s3-upload")
        self._finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="s3-finish")
        self._deferred: list[Future] = []
        self._lock = threading.Lock()
        self._uploads: dict[str, str] = {}
        self._objects: set[str] = set()
        if self._exists(MANIFEST):
            raise GraftError("output_exists", f"{location} already holds a committed graft")
        self.writer = writer or uuid.uuid4().hex
        if self._exists(PENDING):
            other = self._pending_writer()
            if other != self.writer:
                # Another graft claimed this prefix: it may be alive (another job or tenant), so its
                # objects are not ours to delete.
                raise GraftError("output_busy", f"{location} is being written by another graft ({other}); if "
                                 f"that graft is dead, delete {self.key(PENDING)} and its partial objects")
            self._clear_leftovers()  # a killed attempt of this same job
        elif self._has_objects():
            # Never empty a prefix we did not start: it may hold anything (another model, an input).
            raise GraftError("output_exists", f"{location} already holds objects and is not a graft's "
                             "leftovers; choose an empty prefix")
        # Claim the prefix first, so that a retry after a kill knows the leftovers are ours to clear.
        try:  # synchronously: the claim must exist before any upload starts
            self.client.put_object(Bucket=self.bucket, Key=self.key(PENDING), Body=json.dumps({
                "writer": self.writer, "note": "a graft is being written under this prefix; it is not a result "
                                               "until graft-manifest.json exists"}).encode())
        except Exception as exc:
            raise GraftError("storage_error", f"{location}: cannot write to the output: {exc}") from exc
        self.track_object(self.key(PENDING))

    def _exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            return True
        except self.client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchKey", "NotFound"):
                raise GraftError("storage_error", f"{self.location}: cannot check the output: {exc}") from exc
            return False

    def _pending_writer(self) -> str:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(PENDING))["Body"].read()
            return str(json.loads(body).get("writer") or "unknown")
        except Exception:
            return "unknown"

    def _has_objects(self) -> bool:
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise GraftError("storage_error", f"{self.location}: cannot list the output: {exc}") from exc
        return bool(resp.get("Contents"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _clear_leftovers(self) -> None:
        """A retried job finds what a killed attempt left (it left PENDING too): stale uploads and objects."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
        for up in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def track_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads[key] = upload_id

    def finish_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(key, None)
            self._objects.add(key)

    def track_object(self, key: str) -> None:
        with self._lock:
            self._objects.add(key)

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        return _S3Writer(self, name, expected_size)

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> Future:
        self._slots.acquire()

        def send() -> dict:
            try:
                resp = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                               Body=body)
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

    def commit(self, manifest: bytes) -> str:
        self._wait_deferred()
        key = self.key(MANIFEST)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=manifest, IfNoneMatch="*")
        except self.client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            refused = code in ("PreconditionFailed", "412", "ConditionalRequestConflict")
            # A refusal of our own PUT's retry (the first landed, its answer was lost) is a success.
            if not (refused and self._manifest_is(manifest)):
                if refused:
                    raise GraftError("output_exists", f"{self.location} was committed by someone else") from exc
                raise GraftError("storage_error", f"{self.location}: cannot write the manifest: {exc}") from exc
        finally:
            self.pool.shutdown(wait=True)
            self._finisher.shutdown(wait=True)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(PENDING))
        except Exception:
            pass  # harmless: readers trust the manifest, and a later graft here is refused anyway
        return f"s3://{self.bucket}/{key}"

    def abandon(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=False, cancel_futures=True)

    def _manifest_is(self, manifest: bytes) -> bool:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(MANIFEST))["Body"].read() == manifest
        except Exception:
            return False

    def abort(self) -> None:
        # Let in-flight work settle first, so that nothing it completes escapes the clean-up below.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._finisher.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            uploads, objects = dict(self._uploads), set(self._objects)
        for key, upload_id in uploads.items():
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass
        if objects:
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in objects], "Quiet": True})


def open_sink(location: Location, *, endpoint_url: str | None = None, part_bytes: int = 32 << 20,
              writer: str | None = None) -> Sink:
    if location.scheme == "file":
        return LocalSink(location)
    if location.scheme == "s3":
        return S3Sink(location, endpoint_url=endpoint_url, part_bytes=part_bytes, writer=writer)
    raise GraftError("invalid_uri", f"{location}: outputs go to a local directory or s3://")
