"""A timeline of a job's storage requests (GRAFT_TRACE=FILE): every ranged GET of the lanes, every time the
stream waited on a window, every multipart part, completion and manifest write, with start/end seconds, bytes
and the thread (lane) that made it; written as JSON when the job ends. Off (the default), recording is one
attribute test per request.

Why it exists: on a bandwidth-bound link the whole job should take little more than its slowest floor
(reading the inputs with the lanes, uploading the output with the parts in flight); where it takes more, the
timeline shows which lanes idled, when the first output part could start and what the upload's tail was.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Recorder:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, kind: str, t_start: float, **fields) -> None:
        event = {"kind": kind, "t0": round(t_start, 4), "t1": round(self.now(), 4),
                 "thread": threading.current_thread().name, **fields}
        with self._lock:
            self.events.append(event)

    def mark(self, what: str) -> None:
        self.add("mark", self.now(), what=what)


_current: Recorder | None = None


def mark(what: str) -> None:
    """A point of the job on the timeline (the stream's start and end, the commit)."""
    if _current is not None:
        _current.mark(what)


def recorder() -> Recorder | None:
    """The job's recorder, or None when nothing is traced (the common case: callers skip their bookkeeping)."""
    return _current


@contextmanager
def tracing(path: str | None) -> Iterator[Recorder | None]:
    """Record storage requests while the body runs and write them to `path` (JSON) at its end, failed or not.
    One job per process is traced (a CLI run, an RQ work-horse); no path: nothing is recorded."""
    global _current
    if not path or _current is not None:
        yield None
        return
    rec = _current = Recorder()
    try:
        yield rec
    finally:
        _current = None
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"version": 1, "events": sorted(rec.events, key=lambda e: e["t0"])}, fh)
        os.replace(tmp, path)  # a reader never sees half a trace
