"""The queued graft: what an RQ work horse runs, plus the RQ callbacks and the enqueue helper.

This module must stay importable without torch (the API enqueues through it): the engine's heavy parts
are imported inside `run_job`, i.e. in the forked job process, which is also the only process that may
initialise CUDA.
"""

from __future__ import annotations

import threading
import time

import redis
from rq import Callback, Queue, Retry

from .engine.errors import GraftCancelled, GraftError, GraftSuperseded
from .job_store import ACTIVE, JobStore, now_iso
from .settings import Settings, get_settings
from .uri_policy import check_uri

# Engine error codes worth another attempt: the storage may come back. Everything else is the request's
# fault and fails the same way every time.
RETRYABLE = {"storage_error"}
MAX_WARNING_EVENTS = 200


def store_for(settings: Settings, conn: redis.Redis | None = None) -> JobStore:
    return JobStore(conn or redis.Redis.from_url(settings.redis_url), settings.key_prefix)


def enqueue(conn: redis.Redis, job_id: str, settings: Settings) -> None:
    queue = Queue(settings.queue_name, connection=conn)
    retries = max(settings.max_attempts - 1, 0)
    queue.enqueue_call("worker.jobs.run_job", args=(job_id,), job_id=job_id, unique=True,
                       timeout=settings.job_timeout, result_ttl=500, failure_ttl=7 * 24 * 3600,
                       retry=Retry(max=retries) if retries else None,
                       on_failure=Callback("worker.jobs.on_job_failure"),
                       on_stopped=Callback("worker.jobs.on_job_stopped"),
                       description=f"graft {job_id}")


class _Lease(threading.Thread):
    """Keeps the job's lease alive while this process lives; a SIGKILL lets it expire (see monitor.py)."""

    def __init__(self, store: JobStore, job_id: str, seconds: float) -> None:
        super().__init__(daemon=True, name="graft-lease")
        self.store, self.job_id, self.seconds = store, job_id, seconds
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            try:
                self.store.renew_lease(self.job_id, self.seconds)
            except redis.RedisError:
                pass  # the next beat retries; an expired lease only makes a monitor look at RQ's view


class _Reporter:
    """Engine callbacks -> job record: progress throttled to settings.progress_interval, phases as status."""

    PHASE_STATUS = {"resolving": "validating", "planning": "validating", "streaming": "running",
                    "committing": "committing", "done": "committing"}

    def __init__(self, store: JobStore, job_id: str, settings: Settings, attempt: int = 0) -> None:
        self.store, self.job_id, self.settings = store, job_id, settings
        self.attempt = attempt
        self.phase = ""
        self.last_write = 0.0
        self.stream_started = 0.0
        self.last = None
        self.warnings = 0
        self._cancel_checked = 0.0
        self._cancel = False

    def progress(self, p) -> None:
        now = time.monotonic()
        if p.phase != self.phase:
            if p.phase == "streaming":
                self.stream_started = now
            status = self.PHASE_STATUS.get(p.phase, "running")
            self.store.transition(self.job_id, ("validating", "running", "committing"), status,
                                  event={"type": "phase", "phase": p.phase})
            self.phase = p.phase
            self._write(p, now)
        elif now - self.last_write >= self.settings.progress_interval:
            self._write(p, now)
        self.last = p
        if self.settings.job_block_delay and p.phase == "streaming":
            time.sleep(self.settings.job_block_delay)

    def doc(self, p, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        fraction = p.fraction
        eta = None
        if p.phase == "streaming" and 0 < fraction < 1 and self.stream_started:
            eta = round((now - self.stream_started) * (1 - fraction) / fraction, 1)
        elif p.phase in ("committing", "done"):
            eta = 0.0
        return {"phase": p.phase, "tensors_done": p.tensors_done, "tensors_total": p.tensors_total,
                "bytes_read": p.bytes_read, "bytes_written": p.bytes_written, "bytes_total": p.bytes_total,
                "fraction": round(fraction, 4), "eta_seconds": eta}

    def _write(self, p, now: float) -> None:
        self.last_write = now
        self.store.update(self.job_id, progress=self.doc(p, now))

    def warn(self, warning: dict) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNING_EVENTS:
            self.store.add_event(self.job_id, "warning", **{k: v for k, v in warning.items() if k != "type"})
        elif self.warnings == MAX_WARNING_EVENTS + 1:
            self.store.add_event(self.job_id, "warning", code="truncated",
                                 message=f"more than {MAX_WARNING_EVENTS} warnings; the rest are in the manifest")

    def should_cancel(self) -> bool:
        """Called between blocks; one Redis round trip at most every 0.2 s. Also the fence: if the monitor
        took this attempt for dead (its lease lapsed while it lived) and a newer one started, this one
        stops at once without touching the output the newer one is writing."""
        now = time.monotonic()
        if not self._cancel and now - self._cancel_checked >= 0.2:
            self._cancel_checked = now
            self._cancel, current = self.store.controls(self.job_id)
            if self.attempt and current > self.attempt:
                raise GraftSuperseded(f"attempt {current} took over from attempt {self.attempt}")
        return self._cancel


def run_job(job_id: str) -> dict:
    """The RQ job. Its return value is informational only: the job record holds the outcome."""
    settings = get_settings()
    store = store_for(settings)
    record = store.get(job_id)
    if record is None:
        return {"skipped": "no job record"}
    attempt = int(record.get("attempt") or 0) + 1
    store.renew_lease(job_id, settings.lease_seconds)
    fields = {"attempt": attempt, "started_at": record.get("started_at") or now_iso()}
    previous = store.transition(job_id, ("queued", "validating", "running", "committing"), "validating",
                                event={"type": "started", "attempt": attempt}, **fields)
    if previous is None:  # cancelled while queued, or cancelling: nothing to run
        store.transition(job_id, ("cancelling",), "cancelled", event={"type": "finished", "status": "cancelled"},
                         finished_at=now_iso())
        return {"skipped": store.status(job_id)}
    lease = _Lease(store, job_id, settings.lease_seconds)
    lease.start()
    reporter = _Reporter(store, job_id, settings, attempt)
    t0 = time.monotonic()
    try:
        return _execute(store, job_id, record, settings, reporter, t0)
    finally:
        lease.stop.set()


def _execute(store: JobStore, job_id: str, record: dict, settings: Settings, reporter: _Reporter,
             t0: float) -> dict:
    try:
        for role in ("source_base", "source_finetuned", "target_base"):
            check_uri(record[role], role, settings)
        check_uri(record["output"], "output", settings, output=True)
        from .engine import GraftOptions, GraftRequest, run_graft  # torch is imported here, in the job

        request = GraftRequest(record["source_base"], record["source_finetuned"], record["target_base"],
                               record["output"], GraftOptions(**record["options"]), writer=job_id)
        result = run_graft(request, settings=settings, progress=reporter.progress,
                           should_cancel=reporter.should_cancel, warn=reporter.warn)
    except GraftSuperseded as err:
        # The record and the output belong to the newer attempt now: leave both alone.
        store.add_event(job_id, "superseded", message=err.message)
        return {"status": "superseded"}
    except GraftCancelled:
        store.transition(job_id, ACTIVE, "cancelled", event={"type": "finished", "status": "cancelled"},
                         finished_at=now_iso())
        return {"status": "cancelled"}
    except GraftError as err:
        retry_left = int(store.get(job_id).get("attempt") or 1) < settings.max_attempts
        if err.code in RETRYABLE and retry_left:
            raise  # RQ retries it; on_job_failure records the retry
        error = {"code": err.code, "message": err.message}
        store.transition(job_id, ACTIVE, "failed", event={"type": "finished", "status": "failed", "error": error},
                         finished_at=now_iso(), error=error)
        return {"status": "failed", "error": error}
    seconds = time.monotonic() - t0
    progress = reporter.doc(reporter.last) if reporter.last is not None else None
    if progress:
        progress["phase"] = "done"
    out = {"uri": result.output_uri, "manifest_uri": result.manifest_uri,
           "files": [f.to_dict() for f in result.files], "stats": result.stats}
    # cancelling is allowed here: the manifest is written, so the result exists and is reported as such.
    store.transition(job_id, ACTIVE, "succeeded", event={"type": "finished", "status": "succeeded"},
                     finished_at=now_iso(), result=out, progress=progress)
    store.record_finished(seconds, result.stats.get("bytes_read", 0), result.stats.get("bytes_written", 0),
                          result.stats.get("tensors", 0))
    return {"status": "succeeded", "uri": result.output_uri}


def on_job_failure(job, connection, exc_type, exc_value, tb) -> None:
    """An attempt raised or its process died (RQ's AbandonedJobError): record a retry or the failure."""
    settings = get_settings()
    store = store_for(settings, connection)
    reason = f"{exc_type.__name__}: {exc_value}" if exc_value is not None and str(exc_value) else exc_type.__name__
    lost = exc_type.__name__ == "AbandonedJobError"
    if job.retries_left:
        store.transition(job.id, ("queued",) + ACTIVE[:-1], "queued",
                         event={"type": "retry", "reason": "worker lost" if lost else reason,
                                "retries_left": job.retries_left})
        if store.status(job.id) == "cancelling":  # a cancel came in: do not start it again
            store.transition(job.id, ("cancelling",), "cancelled", finished_at=now_iso(),
                             event={"type": "finished", "status": "cancelled"})
        return
    error = {"code": "worker_lost" if lost else "internal_error", "message": reason}
    store.transition(job.id, ("queued",) + ACTIVE, "failed", finished_at=now_iso(), error=error,
                     event={"type": "finished", "status": "failed", "error": error})


def on_job_stopped(job, connection) -> None:
    """The hard stop after a cancel's grace period: the process is gone, so the record says cancelled."""
    store = store_for(get_settings(), connection)
    store.transition(job.id, ("queued",) + ACTIVE, "cancelled", finished_at=now_iso(),
                     event={"type": "finished", "status": "cancelled", "stopped": True})
