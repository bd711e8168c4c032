"""Storage faults: which failures are the storage's (worth trying again) and which are the request's, and
the one retry loop every remote storage operation goes through.

A fault of the storage (connection refused, reset or closed, connect and read timeouts, 5xx, SlowDown and
other throttling, a response cut short) is retried with capped, jittered exponential backoff until the
operation's budget runs out, then surfaces as GraftError("storage_error", ...), which the service retries
as a whole job later. A fault of the request fails at once with its own code:

- `input_not_found` / `output_not_found`: no such bucket, key or repository (404);
- `storage_denied`: access denied, bad or missing credentials (401, 403);
- `storage_rejected`: any other 4xx (the storage refuses this request as made, whenever it is retried).
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.engine.errors import GraftError

log = logging.getLogger("graft.storage")
T = TypeVar("T")

NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion"}
DENIED_CODES = {"401", "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem"}
# Answers of an overloaded or briefly unwell service, whatever their HTTP status.
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
                   "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
                   "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
                   "PriorRequestNotComplete", "BandwidthLimitExceeded", "EC2ThrottledException"}


class TransientStorageError(Exception):
    """Raised by our own code for a storage fault that has no library exception: a response cut short, an
    HTTP 5xx from the hub."""


@dataclass(frozen=True)
class StorageRetry:
    """`budget`: seconds one storage operation keeps retrying, counted from its first try (0: one try).
    `timeout`: seconds one request may wait to connect, or for the next bytes of an answer (a stalled
    connection is a fault like any other). Delays between tries double from `first_delay` up to
    `max_delay`, each drawn at random from its upper half so that many failed calls do not return at once."""

    budget: float = 30.0
    timeout: float = 30.0
    first_delay: float = 0.2
    max_delay: float = 5.0

    def call(self, what: str, fn: Callable[[], T], *, missing: str = "input_not_found",
             stop: threading.Event | None = None) -> T:
        """Run `fn` until it returns, retrying storage faults within the budget. `what` names the location
        and the operation for the error message; `missing` is the code of a 404; `stop`, once set, ends the
        waiting early (the graft is being torn down)."""
        started = time.monotonic()
        deadline = started + self.budget
        tries = 0
        while True:
            tries += 1
            try:
                return fn()
            except GraftError:
                raise
            except Exception as exc:
                fault = classify(exc, missing=missing)
                if fault is None:
                    raise  # not a storage failure: a bug, reported as such
                code, transient = fault
                detail = describe(exc)
                if not transient:
                    raise GraftError(code, f"{what}: {detail}") from exc
                delay = min(self.max_delay, self.first_delay * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
                left = deadline - time.monotonic()
                if left <= 0:
                    message = f"{what}: {detail} (gave up after {tries} tries in {time.monotonic() - started:.1f} s)"
                    log.warning("%s", message)
                    raise GraftError("storage_error", message) from exc
                if tries == 1:
                    log.warning("%s: %s; retrying for up to %.0f s", what, detail, left)
                if stop is None:
                    time.sleep(min(delay, left))
                elif stop.wait(min(delay, left)):
                    raise GraftError("storage_error", f"{what}: {detail} (stopped retrying: the graft is "
                                     "ending)") from exc


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(response, "status_code", None)  # httpx / huggingface_hub
    return int(status) if isinstance(status, int) else None


def _transport_error(exc: BaseException) -> bool:
    """A connection that failed, closed, reset or timed out, in whichever library raised it."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        HTTPClientError,
        IncompleteReadError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, HTTPClientError | BotoConnectionError | IncompleteReadError | Urllib3Error
                  | TransientStorageError | ConnectionError | TimeoutError):
        return True
    for module in ("httpx", "httpx2"):  # huggingface_hub uses one or the other, depending on its version
        mod = sys.modules.get(module)
        transport = getattr(mod, "TransportError", None) if mod is not None else None
        if transport is not None and isinstance(exc, transport):
            return True
    return False


def classify(exc: BaseException, *, missing: str = "input_not_found") -> tuple[str, bool] | None:
    """(error code, whether trying again may help) for a failure of a storage call; None when the exception
    is not a storage failure at all."""
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    code, status = error_code(exc), _http_status(exc)
    if code == "NoSuchUpload":  # our multipart upload is gone (aborted by a cleanup): only a new attempt helps
        return "storage_error", False
    if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
        return "storage_error", True
    if code in NOT_FOUND_CODES or status == 404:
        return missing, False
    if code in DENIED_CODES or status in (401, 403):
        return "storage_denied", False
    if status is not None and 400 <= status < 500:
        return "storage_rejected", False
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "storage_denied", False
    if _transport_error(exc):
        return "storage_error", True
    if isinstance(exc, BotoCoreError):
        return "storage_error", False
    return None


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "..."
