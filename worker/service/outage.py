"""Living through Redis outages in the worker processes (`graft worker`, its threads and its work horses).

Redis going away for a while (a restart, a failover, a network blip) is an expected event, not a bug: every
loop that talks to Redis backs off exponentially (capped) and resumes when it answers again. One process-wide
`OUTAGE` logs the first failure and the recovery, whichever thread sees them, so an outage costs two log lines
rather than one per tick of every loop.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

# What "Redis is unreachable" looks like; BusyLoadingError (a restarted Redis reading its AOF) is a
# ConnectionError. Other Redis errors (a wrong type, OOM, READONLY) are answers, not outages.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
FIRST_DELAY = 0.2

T = TypeVar("T")
log = logging.getLogger("graft.redis")


class Backoff:
    """Delays that double from `first` up to `cap`, with jitter so that many workers do not retry in step."""

    def __init__(self, cap: float, first: float = FIRST_DELAY) -> None:
        self.first = min(first, cap)
        self.cap = cap
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * random.uniform(0.75, 1.0)

    def reset(self) -> None:
        self._next = self.first


class Outage:
    """Whether this process currently sees Redis as down; logs once when that starts and once when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None

    @property
    def active(self) -> bool:
        return self._since is not None

    def down(self, where: str, exc: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning("Redis unreachable (seen by %s: %s); retrying with backoff", where, exc)

    def up(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.warning("Redis reachable again after %.1f s", time.monotonic() - since)


OUTAGE = Outage()


def wait_for_redis(conn: redis.Redis, stop: threading.Event, cap: float, where: str) -> bool:
    """Block until Redis answers a PING (True) or `stop` is set (False)."""
    backoff = Backoff(cap)
    while True:
        try:
            conn.ping()
            OUTAGE.up()
            return True
        except REDIS_DOWN as exc:
            OUTAGE.down(where, exc)
        if stop.wait(backoff.next()):
            return False


def durable(fn: Callable[..., T], *args, limit: float, cap: float, where: str, **kwargs) -> T:
    """`fn(*args, **kwargs)`, tried again while Redis is unreachable, for up to `limit` seconds; past that the
    last error is raised. For writes that must not be lost (a job's terminal status), which must therefore be
    safe to repeat: a command that was applied but whose reply was lost runs a second time."""
    deadline = time.monotonic() + limit
    backoff = Backoff(cap)
    while True:
        try:
            value = fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            OUTAGE.down(where, exc)
            delay = backoff.next()
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            continue
        OUTAGE.up()
        return value


class Gate:
    """Best-effort Redis calls on a hot path (progress, cancel checks): after a failure, calls are not even
    attempted until a backoff delay has passed, so an outage costs the job neither time nor log lines."""

    def __init__(self, cap: float, where: str) -> None:
        self.backoff = Backoff(cap)
        self.where = where
        self._retry_at = 0.0

    def call(self, fn: Callable[..., T], *args, **kwargs) -> tuple[bool, T | None]:
        """(True, result) when the call went through; (False, None) when it was skipped or Redis was down."""
        now = time.monotonic()
        if now < self._retry_at:
            return False, None
        try:
            value = fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            OUTAGE.down(self.where, exc)
            self._retry_at = time.monotonic() + self.backoff.next()
            return False, None
        if self._retry_at:
            self._retry_at = 0.0
            self.backoff.reset()
            OUTAGE.up()
        return True, value


class RQLogFilter(logging.Filter):
    """RQ's worker logs every reconnection attempt (and a traceback when its loop quits on a lost connection);
    those become one line per outage through OUTAGE."""

    MARKERS = ("could not connect to Redis", "Redis connection timeout")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, REDIS_DOWN):
            OUTAGE.down("the RQ work loop", exc)
            return False
        if any(marker in str(record.msg) for marker in self.MARKERS):
            args = record.args if isinstance(record.args, tuple) else ()
            cause = next((a for a in args if isinstance(a, BaseException)), None)
            OUTAGE.down("the RQ work loop", cause or ConnectionError(record.getMessage()))
            return False
        return True
