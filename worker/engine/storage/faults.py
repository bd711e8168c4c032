"""Storage faults: which failures are the storage's (worth trying again) and which are the request's, and
the one retry loop every remote storage operation goes through.

A fault of the storage (connection refused, reset or closed, connect and read timeouts, 5xx, SlowDown and
other throttling, a response cut short) is retried with capped, jittered exponential backoff until the
operation's budget runs out, then surfaces as GraftError("storage_error", ...), which the service retries
as a whole job later. A fault of the request fails at once with its own code:

- `input_not_found` / `output_not_found`: no such bucket, key or repository (404);
- `storage_denied`: access denied, bad or missing credentials (401, 403);
- `storage_rejected`: any other 4xx (the storage refuses this request as made, whenever it is retried).

What a client library's exceptions mean (its error codes, its connection errors) is declared by the scheme
that uses it (storage/schemes/, base.Faults); the decision above is this module's, the same for all.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.engine.errors import GraftError
from worker.engine.storage import schemes

log = logging.getLogger("graft.storage")
T = TypeVar("T")


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


def classify(exc: BaseException, *, missing: str = "input_not_found") -> tuple[str, bool] | None:
    """(error code, whether trying again may help) for a failure of a storage call; None when the exception
    is not a storage failure at all. What each client library's exceptions mean is its scheme's (Faults)."""
    every = [scheme.faults for scheme in schemes.every()]
    code = next((c for f in every if (c := f.error_code(exc))), "")
    status = next((s for f in every if (s := f.http_status(exc)) is not None), None)
    if any(code in f.final_codes for f in every):
        return "storage_error", False
    if any(code in f.transient_codes for f in every) or (status is not None and (status >= 500 or status == 429)):
        return "storage_error", True
    if any(code in f.not_found_codes for f in every) or status == 404:
        return missing, False
    if any(code in f.denied_codes for f in every) or status in (401, 403):
        return "storage_denied", False
    if status is not None and 400 <= status < 500:
        return "storage_rejected", False
    if any(f.no_credentials(exc) for f in every):
        return "storage_denied", False
    if isinstance(exc, TransientStorageError | ConnectionError | TimeoutError) or any(f.transport(exc) for f in every):
        return "storage_error", True
    if any(f.client_error(exc) for f in every):
        return "storage_error", False
    return None


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "..."
