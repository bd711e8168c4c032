"""s3://bucket/prefix: objects on the configured S3-compatible endpoint (storage/s3_store.py reads them,
storage/s3_sink.py writes them, storage/s3.py builds the clients). boto3 is imported only by those."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING
from urllib.parse import ParseResult

from worker.engine.errors import GraftError
from worker.engine.storage.schemes.base import Access, BucketPrefixes, Faults, Listing, Page, Scheme
from worker.engine.storage.uris import Location

if TYPE_CHECKING:
    from worker.engine.storage.sinks import Sink
    from worker.engine.storage.stores import Store

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion"})
DENIED_CODES = frozenset({"401", "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                          "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
                          "AccountProblem"})
# Answers of an overloaded or briefly unwell service, whatever their HTTP status.
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                             "RequestThrottled", "TooManyRequests", "TooManyRequestsException",
                             "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError",
                             "ServiceUnavailable", "OperationAborted", "PriorRequestNotComplete",
                             "BandwidthLimitExceeded", "EC2ThrottledException"})


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """The classes `names` of `module` where it is imported (none otherwise)."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, name) for name in names) if mod is not None else ()


def _transport(exc: BaseException) -> bool:
    classes = (_loaded("botocore.exceptions", "HTTPClientError", "ConnectionError", "IncompleteReadError")
               + _loaded("urllib3.exceptions", "HTTPError"))
    return bool(classes) and isinstance(exc, classes)


def _no_credentials(exc: BaseException) -> bool:
    classes = _loaded("botocore.exceptions", "NoCredentialsError", "PartialCredentialsError")
    return bool(classes) and isinstance(exc, classes)


def _client_error(exc: BaseException) -> bool:
    classes = _loaded("botocore.exceptions", "BotoCoreError")
    return bool(classes) and isinstance(exc, classes)


class _S3Listing(Listing):
    def __init__(self, client) -> None:
        self.client = client

    def page(self, bucket: str, prefix: str, limit: int) -> Page | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=limit)
        except ClientError as exc:
            if error_code(exc) == "NoSuchBucket":
                return None
            raise
        return Page([obj["Key"] for obj in answer.get("Contents", ())],
                    [p["Prefix"] for p in answer.get("CommonPrefixes", ())], bool(answer.get("IsTruncated")))

    def exists(self, bucket: str, key: str) -> bool:
        from worker.engine.storage.s3_sink import object_exists

        return object_exists(self.client, bucket, key)


class S3Scheme(Scheme):
    name = "s3"
    example = "s3://bucket/prefix"
    writable = True
    policy = BucketPrefixes(allowlist="allowed_buckets")
    upload_parts = True
    faults = Faults(transient_codes=TRANSIENT_CODES, not_found_codes=NOT_FOUND_CODES, denied_codes=DENIED_CODES,
                    # our multipart upload is gone (aborted by a cleanup): only a new attempt helps
                    final_codes=frozenset({"NoSuchUpload"}), error_code=error_code, http_status=_http_status,
                    transport=_transport, no_credentials=_no_credentials, client_error=_client_error)

    def parse(self, uri: str, parsed: ParseResult, field: str) -> Location:
        bucket = parsed.netloc
        if not _BUCKET.match(bucket):
            raise GraftError("invalid_uri", f"{field}: not a valid bucket name in {uri}")
        prefix = parsed.path.strip("/")
        if any(part in ("..", ".") for part in prefix.split("/")):
            raise GraftError("invalid_uri", f"{field}: '.' or '..' segments in {uri}")
        return Location("s3", bucket=bucket, prefix=prefix)

    def render(self, location: Location) -> str:
        return f"s3://{location.bucket}/{location.prefix}" if location.prefix else f"s3://{location.bucket}"

    def child(self, location: Location, name: str) -> Location:
        prefix = f"{location.prefix}/{name}" if location.prefix else name
        return Location("s3", bucket=location.bucket, prefix=prefix)

    def open_store(self, location: Location, access: Access) -> Store:
        from worker.engine.storage.s3_store import S3Store

        return S3Store(location, access.endpoint_url, access.retry, access.reads)

    def open_sink(self, location: Location, access: Access) -> Sink:
        from worker.engine.storage.s3_sink import S3Sink

        return S3Sink(location, endpoint_url=access.endpoint_url, part_bytes=access.part_bytes,
                      parts_in_flight=access.parts_in_flight, writer=access.writer, retry=access.retry,
                      manifest_name=access.manifest_name, split=access.split)

    def remove(self, location: Location, names: list[str], access: Access) -> None:
        from worker.engine.storage.faults import StorageRetry
        from worker.engine.storage.s3 import s3_client
        from worker.engine.storage.s3_sink import delete_keys

        retry = access.retry or StorageRetry()
        keys = [self.child(location, name).prefix for name in names]
        # One request per key, in order: a batched DeleteObjects removes its keys in no stated order, and the
        # manifest must go first. An artifact holds few files (shards of gigabytes and its side files).
        client = s3_client(access.endpoint_url, retry.timeout)
        for key in keys:
            delete_keys(client, location.bucket, [key], retry, str(location))

    def ready(self, location: Location, endpoint_url: str | None) -> str:
        from worker.engine.storage.s3 import s3_client

        s3_client(endpoint_url).head_bucket(Bucket=location.bucket)
        return "ok"

    def listing(self, endpoint_url: str | None, timeout: float) -> Listing:
        from worker.engine.storage.s3 import s3_client

        # The shared, pooled client of this endpoint: its connections outlive the check, as everyone's do.
        return _S3Listing(s3_client(endpoint_url, timeout))


SCHEME = S3Scheme()
