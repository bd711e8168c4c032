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

from worker.engine.errors import GraftCancelled, GraftError, GraftSuperseded
from worker.engine.phases import Phase
from worker.service import diffs
from worker.service.job_store import ACTIVE, JobStore, now_iso
from worker.service.kinds import kind_of
from worker.service.outage import OUTAGE, REDIS_DOWN, Backoff, Gate, durable
from worker.service.settings import Settings, get_settings
from worker.service.statuses import JobStatus
from worker.service.uri_policy import check_output_placement, check_uri, scope_for

# Engine error codes worth another attempt: the storage may come back. Everything else is the request's
# fault and fails the same way every time.
RETRYABLE = {"storage_error"}
RETRY_DELAY_CAP = 600.0  # seconds: the longest wait between two attempts of a job
MAX_WARNING_EVENTS = 200


def store_for(settings: Settings, conn: redis.Redis | None = None) -> JobStore:
    conn = conn or redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                                        socket_connect_timeout=settings.redis_timeout)
    return JobStore(conn, settings.key_prefix)


def _wait(settings: Settings, where: str, fn, *args, **kwargs):
    """A job-record write that must not be lost to a Redis outage: retried (bounded by redis_wait_seconds)."""
    return durable(fn, *args, limit=settings.redis_wait_seconds, cap=settings.redis_retry_max, where=where,
                   **kwargs)


def enqueue(conn: redis.Redis, job_id: str, settings: Settings) -> None:
    queue = Queue(settings.queue_name, connection=conn)
    retries = max(settings.max_attempts - 1, 0)
    queue.enqueue_call("worker.service.jobs.run_job", args=(job_id,), job_id=job_id, unique=True,
                       timeout=settings.job_timeout, result_ttl=500, failure_ttl=7 * 24 * 3600,
                       retry=Retry(max=retries) if retries else None,
                       on_failure=Callback("worker.service.jobs.on_job_failure"),
                       on_stopped=Callback("worker.service.jobs.on_job_stopped"),
                       description=f"graft {job_id}")


class _Lease(threading.Thread):
    """Keeps the job's lease alive while this process lives; a SIGKILL lets it expire (see monitor.py).

    While Redis is unreachable the lease cannot be renewed and may expire (Redis expiries are wall-clock):
    renewals are then retried every second at most, so the lease is back as soon as Redis is, well within the
    full lease period a monitor waits after an outage before it judges leases."""

    def __init__(self, store: JobStore, job_id: str, seconds: float) -> None:
        super().__init__(daemon=True, name="graft-lease")
        self.store, self.job_id, self.seconds = store, job_id, seconds
        self.stop = threading.Event()

    def run(self) -> None:
        beat = self.seconds / 3
        backoff = Backoff(cap=min(1.0, beat))
        delay = beat
        while not self.stop.wait(delay):
            try:
                self.store.renew_lease(self.job_id, self.seconds)
            except REDIS_DOWN as exc:
                OUTAGE.down("a job's lease", exc)
                delay = backoff.next()
                continue
            except redis.RedisError:
                pass  # an answer, not an outage (OOM, READONLY): the next beat tries again
            OUTAGE.up()
            backoff.reset()
            delay = beat


class _Reporter:
    """Engine callbacks -> job record: progress throttled to settings.progress_interval, phases as status."""

    # Engine phases (worker.engine.pipeline.graft.Phase) -> job statuses; anything else (statistics) is "running".
    PHASE_STATUS = {Phase.RESOLVING: JobStatus.VALIDATING, Phase.STREAMING: JobStatus.RUNNING,
                    Phase.COMMITTING: JobStatus.COMMITTING, Phase.DONE: JobStatus.COMMITTING}
    TIMED = (Phase.STREAMING, Phase.INSPECTING)  # the passes an ETA is taken from

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
        # Everything the reporter writes or reads is best effort: while Redis is unreachable the graft goes on
        # and the record catches up when Redis is back (a phase's status at the next block).
        self._redis = Gate(settings.redis_retry_max, "a job's progress")
        self._phase_due = False

    def progress(self, p) -> None:
        now = time.monotonic()
        if p.phase != self.phase:
            if p.phase in self.TIMED:
                self.stream_started = now
            self.phase = p.phase
            self._phase_due = True
        if self._phase_due:
            status = self.PHASE_STATUS.get(p.phase, JobStatus.RUNNING)
            written, _ = self._redis.call(self.store.transition, self.job_id, ("validating", "running", "committing"),
                                          status, event={"type": "phase", "phase": p.phase})
            if written:
                self._phase_due = False
                self._write(p, now)
        elif now - self.last_write >= self.settings.progress_interval:
            self._write(p, now)
        self.last = p
        if self.settings.job_block_delay and p.phase == Phase.STREAMING:
            time.sleep(self.settings.job_block_delay)

    def doc(self, p, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        fraction = p.fraction
        eta = None
        if p.phase in self.TIMED and 0 < fraction < 1 and self.stream_started:
            eta = round((now - self.stream_started) * (1 - fraction) / fraction, 1)
        elif p.phase in (Phase.COMMITTING, Phase.DONE):
            eta = 0.0
        return {"phase": p.phase, "tensors_done": p.tensors_done, "tensors_total": p.tensors_total,
                "bytes_read": p.bytes_read, "bytes_written": p.bytes_written, "bytes_total": p.bytes_total,
                "fraction": round(fraction, 4), "eta_seconds": eta}

    def _write(self, p, now: float) -> None:
        self.last_write = now
        self._redis.call(self.store.update, self.job_id, progress=self.doc(p, now))

    def warn(self, warning: dict) -> None:
        # A warning lost to an outage is still in the manifest.
        self.warnings += 1
        if self.warnings <= MAX_WARNING_EVENTS:
            # A quality warning is an event of its own type: a pipeline waits for exactly that one.
            kind = "quality_warning" if warning.get("code") == "quality_warning" else "warning"
            self._redis.call(self.store.add_event, self.job_id, kind,
                             **{k: v for k, v in warning.items() if k != "type"})
        elif self.warnings == MAX_WARNING_EVENTS + 1:
            self._redis.call(self.store.add_event, self.job_id, "warning", code="truncated",
                             message=f"more than {MAX_WARNING_EVENTS} warnings; the rest are in the manifest")

    def should_cancel(self) -> bool:
        """Called between blocks; one Redis round trip at most every 0.2 s. Also the fence: if the monitor
        took this attempt for dead (its lease lapsed while it lived) and a newer one started, this one
        stops at once without touching the output the newer one is writing. An unreachable Redis is no news:
        the graft goes on."""
        now = time.monotonic()
        if not self._cancel and now - self._cancel_checked >= 0.2:
            self._cancel_checked = now
            answered, controls = self._redis.call(self.store.controls, self.job_id)
            if answered:
                self._cancel, current = controls
                if self.attempt and current > self.attempt:
                    raise GraftSuperseded(f"attempt {current} took over from attempt {self.attempt}")
        return self._cancel


def run_job(job_id: str) -> dict:
    """The RQ job. Its return value is informational only: the job record holds the outcome."""
    settings = get_settings()
    store = store_for(settings)
    # A start during a Redis outage waits for Redis rather than failing the attempt.
    record = _wait(settings, "a job's start", store.get, job_id)
    if record is None:
        return {"skipped": "no job record"}
    attempt = int(record.get("attempt") or 0) + 1
    _wait(settings, "a job's start", store.renew_lease, job_id, settings.lease_seconds)
    fields = {"attempt": attempt, "started_at": record.get("started_at") or now_iso()}
    previous = _wait(settings, "a job's start", store.transition, job_id,
                     ("queued", "validating", "running", "committing"), "validating",
                     event={"type": "started", "attempt": attempt}, **fields)
    if previous is None:  # cancelled while queued, or cancelling: nothing to run
        _wait(settings, "a job's end", store.transition, job_id, ("cancelling",), "cancelled",
              event={"type": "finished", "status": "cancelled"}, finished_at=now_iso())
        return {"skipped": "not queued"}
    lease = _Lease(store, job_id, settings.lease_seconds)
    lease.start()
    reporter = _Reporter(store, job_id, settings, attempt)
    t0 = time.monotonic()
    try:
        return _execute(store, job_id, record, settings, reporter, t0)
    finally:
        lease.stop.set()


def prepare(store: JobStore, job_id: str, record: dict, settings: Settings) -> tuple:
    """(kind, engine request, checks spec) of a job, its inputs and output checked against the tenant's policy
    again in the worker; what it raises (GraftError) fails the job."""
    kind = kind_of(record)
    # The policy is the submitting tenant's, checked again here (a read that waits out an outage).
    tenant = _wait(settings, "reading the job's tenant", store.tenant_of, job_id)
    # A diff deleted since submission: refused before anything is resolved or written.
    _wait(settings, "checking the job's diffs", diffs.check_not_deleted, store, diffs.artifacts(record))
    for role, uri in kind.inputs(record).items():
        check_uri(uri, role, settings, tenant=tenant)
    # Again here: a model, a result or another job's output being written above the output since
    # submission still protects its directory. The output's own contents and claim are the sink's to judge
    # (a retry finds its own files there).
    check_output_placement(check_uri(record["output"], "output", settings, output=True, tenant=tenant),
                           "output", settings, tenant=tenant, itself=False)
    confinement = dict(zip(("allowed_roots", "denied_roots"), scope_for(tenant, settings).engine_roots(),
                           strict=True))
    spec = _wait(settings, "reading the job's checks", store.checks_spec, job_id)
    return kind, kind.request(record, spec, job_id, confinement), spec


def _execute(store: JobStore, job_id: str, record: dict, settings: Settings, reporter: _Reporter,
             t0: float) -> dict | Retry:
    from worker.service import fanout

    try:
        kind, request, spec = prepare(store, job_id, record, settings)
        # A large graft of several output shards runs as one task per shard (worker/service/fanout.py).
        if fanout.split_job(store, job_id, record, kind, request, spec, settings, reporter):
            return {"status": "split"}
        out = kind.run(request, spec, settings, reporter)
    except GraftSuperseded as err:
        # The record and the output belong to the newer attempt now: leave both alone.
        try:
            store.add_event(job_id, "superseded", message=err.message)
        except REDIS_DOWN:
            pass  # a note only; the newer attempt owns the record
        return {"status": "superseded"}
    except GraftCancelled:
        _wait(settings, "a job's end", store.transition, job_id, ACTIVE, "cancelled",
              event={"type": "finished", "status": "cancelled"}, finished_at=now_iso())
        return {"status": "cancelled"}
    except GraftError as err:
        return fail_or_retry(store, job_id, record, settings, err)
    progress = reporter.doc(reporter.last) if reporter.last is not None else None
    return succeed(store, job_id, record, kind, out, settings, progress, time.monotonic() - t0)


def fail_or_retry(store: JobStore, job_id: str, record: dict, settings: Settings, err: GraftError) -> dict | Retry:
    """A job's attempt ended with `err`: another attempt later if it is a storage error with attempts left,
    else the job fails with it."""
    err = _deleted_meanwhile(store, settings, record, err)
    attempt = int(_wait(settings, "a job's end", store.get, job_id).get("attempt") or 1)
    if err.code in RETRYABLE and attempt < settings.max_attempts:
        return _retry_later(store, job_id, settings, attempt, err)
    return fail(store, job_id, settings, err)


def fail(store: JobStore, job_id: str, settings: Settings, err: GraftError) -> dict:
    error = {"code": err.code, "message": err.message}
    if err.code == "incompatible_bases":  # the verdict and its reasons: why nothing was built
        error["details"] = err.details
    _wait(settings, "a job's end", store.transition, job_id, ACTIVE, "failed",
          event={"type": "finished", "status": "failed", "error": error}, finished_at=now_iso(), error=error)
    return {"status": "failed", "error": error}


def succeed(store: JobStore, job_id: str, record: dict, kind, out: dict, settings: Settings,
            progress: dict | None, seconds: float) -> dict:
    """The job's result is published: the record says succeeded (webhook queued in the same transaction)."""
    if progress:
        progress["phase"] = Phase.DONE.value
    # A kind whose succeeded jobs form a collection (diffs) lists this one in the same transaction.
    also = (lambda pipe, tenant: kind.collect(pipe, store, tenant, record)) if kind.collect is not None else None
    # cancelling is allowed here: the manifest is written, so the result exists and is reported as such.
    _wait(settings, "a job's end", store.transition, job_id, ACTIVE, "succeeded", also=also,
          event={"type": "finished", "status": "succeeded"}, finished_at=now_iso(), result=out, progress=progress)
    try:  # not repeatable (counters), so not waited for: a metric lost to an outage is the lesser harm
        stats = out["stats"]
        store.record_finished(seconds, stats.get("bytes_read", 0), stats.get("bytes_written", 0),
                              stats.get("tensors", 0))
    except REDIS_DOWN:
        pass
    return {"status": "succeeded", "uri": out["uri"]}


def _deleted_meanwhile(store: JobStore, settings: Settings, record: dict, err: GraftError) -> GraftError:
    """A job that failed while a diff it reads was being deleted (its manifest or shards gone under it) fails
    as one naming a deleted diff does, `diff_deleted`, with what it met; not retried: the diff is gone."""
    named = diffs.artifacts(record)
    if err.code == "diff_deleted" or not named:
        return err
    try:
        _wait(settings, "checking the job's diffs", diffs.check_not_deleted, store, named)
    except GraftError as deleted:
        return GraftError("diff_deleted", f"{deleted.message} while the job ran ({err.code}: {err.message})")
    return err


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds between a storage failure of attempt `attempt` (1-based) and the next attempt."""
    return min(RETRY_DELAY_CAP, settings.retry_backoff * 2 ** (attempt - 1))


def _retry_later(store: JobStore, job_id: str, settings: Settings, attempt: int, err: GraftError) -> Retry | dict:
    """The storage failed past the engine's own retries: try the whole job again after a delay that doubles
    each attempt. Returned to RQ, not raised: RQ's scheduler (run by every worker) enqueues it again
    `delay` seconds from now. A raised error would be retried at once, through the failure callback,
    which is right for a lost worker but not for an outage that has just outlasted one attempt."""
    delay = retry_delay(settings, attempt)
    event = {"type": "retry", "reason": f"{err.code}: {err.message}", "code": err.code, "attempt": attempt,
             "delay_seconds": delay}
    if _wait(settings, "a job's retry", store.transition, job_id, ACTIVE[:-1], "queued", event=event) is None:
        # cancelling: the cancel wins, nothing is started again
        _wait(settings, "a job's end", store.transition, job_id, ("cancelling",), "cancelled",
              finished_at=now_iso(), event={"type": "finished", "status": "cancelled"})
        return {"status": "cancelled"}
    # max is never reached (our attempt count stops first); RQ fails a job past it without any callback.
    return Retry(max=settings.max_attempts + 1, interval=[delay])


def on_job_failure(job, connection, exc_type, exc_value, tb) -> None:
    """An attempt raised or its process died (RQ's AbandonedJobError): record a retry or the failure."""
    settings = get_settings()
    store = store_for(settings, connection)
    reason = f"{exc_type.__name__}: {exc_value}" if exc_value is not None and str(exc_value) else exc_type.__name__
    lost = exc_type.__name__ == "AbandonedJobError"
    # Storage retries (_retry_later) do not consume RQ's retries_left: our attempt count bounds them all. A
    # retry RQ makes past it finds the record failed and does nothing (see run_job).
    attempt = int((_wait(settings, "a job's retry", store.get, job.id) or {}).get("attempt") or 0)
    if job.retries_left and attempt < settings.max_attempts:
        _wait(settings, "a job's retry", store.transition, job.id, ("queued",) + ACTIVE[:-1], "queued",
              event={"type": "retry", "reason": "worker lost" if lost else reason, "retries_left": job.retries_left})
        if _wait(settings, "a job's retry", store.status, job.id) == "cancelling":  # do not start it again
            _wait(settings, "a job's end", store.transition, job.id, ("cancelling",), "cancelled",
                  finished_at=now_iso(), event={"type": "finished", "status": "cancelled"})
        return
    error = {"code": "worker_lost" if lost else "internal_error", "message": reason}
    _wait(settings, "a job's end", store.transition, job.id, ("queued",) + ACTIVE, "failed", finished_at=now_iso(),
          error=error, event={"type": "finished", "status": "failed", "error": error})


def on_job_stopped(job, connection) -> None:
    """The hard stop after a cancel's grace period: the process is gone, so the record says cancelled."""
    settings = get_settings()
    store = store_for(settings, connection)
    _wait(settings, "a job's end", store.transition, job.id, ("queued",) + ACTIVE, "cancelled", finished_at=now_iso(),
          event={"type": "finished", "status": "cancelled", "stopped": True})
