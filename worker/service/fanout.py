"""One graft over many workers: a job whose output has several shards and at least `shard_min_bytes` runs as one
task per output shard plus a finalize task, all on the job's RQ queue, tracked by our own task records
(task_records.py). The job stays one job to its user: one status, progress summed over its tasks, its events,
one cancel, one webhook.

- The job's first task (jobs.run_job) plans it from the headers, stores the plan with the job (pipeline/shards.py
  describe_split), claims the output, and queues the shard tasks.
- A shard task checks its inputs and plan against the stored one, reads only its shard's ranges and writes that
  shard; the task that completes the set of shards queues the finalize task, which writes the index, the side
  files, the checks' sections and the manifest last, and marks the job succeeded.
- A task whose worker dies stops renewing its lease; the monitor (monitor.py) expires its RQ execution and RQ's
  retry queues it again: one shard's work is lost, not the job's. A failed task fails the job; a cancel stops
  every task; once no task runs, what was written is removed (discard_split) and the job ends.
- Fairness: shard tasks wait in the job's record and are queued round-robin across tenants, at most
  `shard_queued_per_tenant` of a tenant's waiting on RQ at once, so a tenant's one-task job is queued behind at
  most that many tasks of each other tenant, never behind a 400-shard job. `options.parallelism` caps a job's
  tasks queued or running at once.

Importable without torch: the engine is imported inside the functions that run in a job's process.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis
from rq import Callback, Queue, Retry, get_current_job
from rq.job import Job

from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.phases import Phase
from worker.service.job_store import ACTIVE, JobStore, now_iso
from worker.service.outage import REDIS_DOWN
from worker.service.settings import Settings, get_settings
from worker.service.statuses import JobStatus
from worker.service.task_records import FINAL, TASK_SHARD, TaskRecords, task_id

log = logging.getLogger("graft.fanout")
PUMP_LOCK_MS = 5000
# Delete the lock only if it is still ours: a pump that outlived PUMP_LOCK_MS must not free the next holder's.
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def records_for(store: JobStore) -> TaskRecords:
    return TaskRecords(store.r, store.p)


# --- the split: in the job's first task ---------------------------------------------------------------------

def split_job(store: JobStore, job_id: str, record: dict, kind, request, spec: dict, settings: Settings,
              reporter) -> bool:
    """Split the job into shard tasks when it is large enough; False: it runs as one task, as before."""
    from worker.engine.pipeline.shards import claim_split, plan_split

    if kind.name != "graft" or (spec or {}).get("alpha") is not None:
        return False  # an alpha sweep builds and scores whole candidates: one task
    records = records_for(store)
    if records.is_split(job_id):  # a planning task that died after splitting: the split stands
        pump(store.r, settings)
        return True
    split = plan_split(request, settings)
    shards = len(split["shards"])
    if shards < 2 or split["output_bytes"] < settings.shard_min_bytes:
        return False
    sections = _before_split(request, spec, settings, reporter)
    claim_split(request, settings)
    options = (record.get("recipe") or {}).get("options") or {}
    parallelism = min(int(options.get("parallelism") or shards), shards)
    tenant = store.tenant_of(job_id) or ""
    if records.create(job_id, split, tenant, parallelism, sections):
        store.transition(job_id, ("validating", "running"), JobStatus.RUNNING,
                         event={"type": "split", "shards": shards, "parallelism": parallelism,
                                "output_bytes": split["output_bytes"], "input_bytes": split["input_bytes"]},
                         progress=_progress({}, split, Phase.STREAMING))
    pump(store.r, settings)
    settle(store, job_id, settings)  # a cancel that came while planning
    return True


def _before_split(request, spec: dict, settings: Settings, reporter) -> dict:
    """What a checked graft decides before writing anything: `require` (the weights-level verdict) runs once,
    here; its section goes into the manifest finalize writes."""
    if not (spec or {}).get("require"):
        return {}
    from worker.engine.checks.checked_graft import require_compatible
    from worker.engine.pipeline.hooks import Hooks

    hooks = Hooks(settings, reporter.progress, reporter.should_cancel, reporter.warn)
    return {"preflight": require_compatible(request, hooks)}


def _progress(tasks: dict[str, dict], split: dict, phase: Phase) -> dict:
    written = sum(t.get("bytes_written", 0) for t in tasks.values())
    total = split["output_bytes"]
    return {"phase": phase.value, "tensors_done": sum(t.get("tensors_done", 0) for t in tasks.values()),
            "tensors_total": split["tensors"], "bytes_read": sum(t.get("bytes_read", 0) for t in tasks.values()),
            "bytes_written": written, "bytes_total": total, "fraction": round(written / total, 4) if total else 0.0,
            "eta_seconds": None, "shards_total": len(split["shards"])}


# --- queueing: round robin over tenants ---------------------------------------------------------------------

def _claim_key(settings: Settings, job_id: str, task: str) -> str:
    return f"{settings.key_prefix}queueing:{task_id(job_id, task)}"


def _queue_task(conn: redis.Redis, records: TaskRecords, job_id: str, task: str, tenant: str | None,
                settings: Settings, *, exclusive: bool = True) -> bool:
    """Record `task` queued and put it on RQ under its fixed id. A short claim covers the gap between the two,
    so that the monitor does not take a task being queued for one lost; exclusive: queue only when nobody
    holds the claim (finalize and recoveries, which more than one caller may find due), False when someone
    does. The pump's tasks come off the pending list, once each: not exclusive."""
    claim = _claim_key(settings, job_id, task)
    if not conn.set(claim, b"1", nx=exclusive, px=int(settings.lease_seconds * 1000)):
        return False
    records.queued(job_id, task, tenant)
    _enqueue(conn, job_id, task, settings)
    return True


def queue_final_if_due(store: JobStore, job_id: str, settings: Settings) -> bool:
    """Queue the finalize task of a running split job whose every shard is written and whose finalize has no RQ
    job: the task that completed the set died (or Redis failed it) between recording its shard and queueing
    finalize, and its retry finds the shard written. The fixed RQ id makes a repeat harmless."""
    records = records_for(store)
    held = records.load(job_id)
    if held is None or records.done_count(job_id) < len(held["split"]["shards"]):
        return False
    status = store.status(job_id)
    if status not in ACTIVE or status == "cancelling" or Job.exists(task_id(job_id, FINAL), connection=store.r):
        return False
    if not _queue_task(store.r, records, job_id, FINAL, None, settings):
        return False
    store.add_event(job_id, "task_requeued", task=FINAL, reason="every shard written, finalize not queued")
    return True


def requeue_missing(store: JobStore, job_id: str, task: str, settings: Settings) -> str:
    """A task recorded queued or running whose RQ job does not exist (Redis failed between recording it and
    queueing it, or its RQ job expired after it ended without its record being cleared). Returns what was done:
    "requeued" (it never ran and the job still wants it), "ended" (its record cleared) or "" (someone is
    queueing it now)."""
    records = records_for(store)
    held = records.load(job_id)
    if held is None:
        return ""
    status = store.status(job_id)
    wanted = status in ACTIVE and status != "cancelling"
    if wanted and task != FINAL and not records.is_done(job_id, int(task.removeprefix(TASK_SHARD))):
        if not _queue_task(store.r, records, job_id, task, held["tenant"], settings):
            return ""
        store.add_event(job_id, "task_requeued", task=task, reason="its RQ job was missing")
        return "requeued"
    records.ended(job_id, task, held["tenant"])
    if wanted and task == FINAL:
        queue_final_if_due(store, job_id, settings)
    return "ended"


def _enqueue(conn: redis.Redis, job_id: str, task: str, settings: Settings, *, rq_id: str | None = None) -> None:
    retries = max(settings.max_attempts - 1, 0)
    Queue(settings.queue_name, connection=conn).enqueue_call(
        "worker.service.fanout.run_task", args=(job_id, task), job_id=rq_id or task_id(job_id, task),
        timeout=settings.job_timeout, result_ttl=500, failure_ttl=7 * 24 * 3600,
        retry=Retry(max=retries) if retries else None, on_failure=Callback("worker.service.fanout.on_task_failure"),
        description=f"graft {job_id} {task}")


def pump(conn: redis.Redis, settings: Settings) -> int:
    """Queue waiting shard tasks on RQ: one per tenant in turn, while the tenant has fewer than
    `shard_queued_per_tenant` waiting there and the job fewer than its parallelism queued or running. Called
    whenever a task starts or ends and by every monitor tick; one caller at a time (a lock), and a caller that
    finds it held leaves the work to the holder or the next tick. Returns the tasks queued."""
    records = TaskRecords(conn, settings.key_prefix)
    lock, token = f"{settings.key_prefix}split:pump", uuid.uuid4().hex
    if not conn.set(lock, token, nx=True, px=PUMP_LOCK_MS):
        return 0
    try:
        queued, progress = 0, True
        while progress:
            progress = False
            for tenant in [t.decode() for t in conn.lrange(records.ring_key, 0, -1)]:
                got = _pump_tenant(conn, records, tenant, settings)
                if got is None:  # nothing left to queue for this tenant: out of the ring, unless a job came since
                    progress = progress or not records.leave_ring(tenant)
                    continue
                if got:
                    queued += 1
                    progress = True
                    conn.lmove(records.ring_key, records.ring_key, "LEFT", "RIGHT")  # the next tenant first
        return queued
    finally:
        conn.eval(_UNLOCK, 1, lock, token)


def _pump_tenant(conn: redis.Redis, records: TaskRecords, tenant: str, settings: Settings) -> bool | None:
    """Queue one task of the tenant's oldest job that may take one: True; False when the tenant is at its cap
    or its jobs at their parallelism; None when it has nothing waiting."""
    jobs = [j.decode() for j in conn.lrange(records.tenant_jobs_key(tenant), 0, -1)]
    waiting = [j for j in jobs if records.pending_count(j)]
    if not waiting:
        return None
    if conn.scard(records.tenant_queued_key(tenant)) >= max(1, settings.shard_queued_per_tenant):
        return False
    for job_id in waiting:
        held = records.load(job_id)
        if held is None or len(records.active(job_id)) >= held["parallelism"]:
            continue
        task = records.take_pending(job_id)
        if task is None:
            continue
        _queue_task(conn, records, job_id, task, tenant, settings, exclusive=False)
        return True
    return False


# --- a task ---------------------------------------------------------------------------------------------------

def _task_reporter(store: JobStore, job_id: str, task: str, split: dict, settings: Settings):
    from worker.service.jobs import _Reporter

    class TaskReporter(_Reporter):
        """A task's progress goes to its own slot; the job's is the sum of its tasks'. Only the finalize task
        moves the job's status (committing); no fence: a superseded task writes the same bytes."""

        def progress(self, p) -> None:
            now = time.monotonic()
            moved = p.phase != self.phase
            self.phase, self.last = p.phase, p
            if task == FINAL and moved and p.phase in (Phase.EVALUATING, Phase.COMMITTING):
                self._redis.call(self.store.transition, job_id, ("running",), JobStatus.COMMITTING,
                                 event={"type": "phase", "phase": p.phase})
            if moved or now - self.last_write >= self.settings.progress_interval:
                self._write(p, now)
            if self.settings.job_block_delay and p.phase == Phase.STREAMING:
                time.sleep(self.settings.job_block_delay)

        def _write(self, p, now: float) -> None:
            self.last_write = now
            self._redis.call(self._publish, p)

        def _publish(self, p) -> None:
            tasks = records_for(self.store).set_progress(job_id, task, self.doc(p))
            phase = Phase.COMMITTING if task == FINAL else Phase.STREAMING
            self.store.update(job_id, progress=_progress(tasks, split, phase))

    return TaskReporter(store, job_id, settings, 0)


def run_task(job_id: str, task: str) -> dict:
    """The RQ job of one task of a split graft: `s<index>` writes that output shard, `final` publishes."""
    from worker.service.jobs import _Lease, _wait, store_for

    settings = get_settings()
    store = store_for(settings)
    records = records_for(store)
    current = get_current_job()
    rq_id = current.id if current is not None else task_id(job_id, task)
    store.renew_lease(rq_id, settings.lease_seconds)  # first: the monitor judges a started task by its lease
    held = _wait(settings, "a task's start", records.load, job_id)
    if held is None:
        return {"skipped": "no split"}
    records.started(job_id, task, held["tenant"])
    pump(store.r, settings)
    record = _wait(settings, "a task's start", store.get, job_id)
    if record is None or record["status"] not in ACTIVE or record["status"] == "cancelling":
        _end(store, job_id, task if rq_id == task_id(job_id, task) else None, held["tenant"], settings)
        return {"skipped": "the job is not running"}
    store.add_event(job_id, "task_started", task=task, task_id=rq_id,
                    retries_left=current.retries_left if current is not None else None)
    lease = _Lease(store, rq_id, settings.lease_seconds)
    lease.start()
    retried = False
    try:
        return _run(store, job_id, task, record, held, settings)
    except Exception:
        retried = True  # still the job's task: RQ's retry runs it again, or on_task_failure ends it
        raise
    finally:
        # The lease is left to expire: RQ marks the task finished only after this returns, and a monitor
        # finding a started task without a lease in between would take it for dead.
        lease.stop.set()
        if not retried:
            _end(store, job_id, task if rq_id == task_id(job_id, task) else None, held["tenant"], settings)


def _run(store: JobStore, job_id: str, task: str, record: dict, held: dict, settings: Settings) -> dict:
    from worker.service.jobs import fail, prepare

    split = held["split"]
    reporter = _task_reporter(store, job_id, task, split, settings)
    t0 = time.monotonic()
    try:
        kind, request, spec = prepare(store, job_id, record, settings)
        if task == FINAL:
            return _finalize(store, job_id, record, kind, request, spec, held, settings, reporter, t0)
        from worker.engine.pipeline.hooks import Hooks
        from worker.engine.pipeline.shards import run_shard

        index = int(task.removeprefix(TASK_SHARD))
        if records_for(store).is_done(job_id, index):  # a duplicate, or a retry whose shard another copy wrote
            store.add_event(job_id, "task_skipped", task=task, reason="shard already written")
            queue_final_if_due(store, job_id, settings)  # a retry of the task that died before queueing it
            return {"status": "skipped"}
        hooks = Hooks(settings, reporter.progress, reporter.should_cancel, lambda w: None)
        result = run_shard(request, split, index, settings, hooks)
    except GraftCancelled:
        store.add_event(job_id, "task_cancelled", task=task)
        return {"status": "cancelled"}
    except GraftError as err:
        if err.code == "storage_error":
            raise  # RQ's retry of this task (on_task_failure), as a lost worker's
        if task != FINAL and records_for(store).is_done(job_id, int(task.removeprefix(TASK_SHARD))):
            # Another copy of this task wrote the shard (and finalize may have published the job since).
            store.add_event(job_id, "task_skipped", task=task, reason=f"shard already written ({err.code})")
            return {"status": "skipped"}
        if store.status(job_id) in ACTIVE:
            store.request_cancel(job_id)  # the other tasks stop; the last one out removes what was written
            fail(store, job_id, settings, err)
        return {"status": "failed", "error": err.code}
    records = records_for(store)
    store.add_event(job_id, "task_finished", task=task, seconds=result["seconds"])
    if records.shard_written(job_id, index, result, len(split["shards"])):
        _queue_task(store.r, records, job_id, FINAL, None, settings)
    return {"status": "written", "shard": index}


def _finalize(store: JobStore, job_id: str, record: dict, kind, request, spec: dict, held: dict,
              settings: Settings, reporter, t0: float) -> dict:
    from worker.engine.checks.checked_graft import Checks, _evaluator
    from worker.engine.pipeline.hooks import Hooks
    from worker.engine.pipeline.shards import finalize_split
    from worker.service.jobs import succeed

    hooks = Hooks(settings, reporter.progress, reporter.should_cancel, reporter.warn)
    checks = Checks.model_validate({k: v for k, v in (spec or {}).items() if k != "alpha"})
    evaluate = _evaluator(checks.evaluate, request, hooks) if checks.evaluate is not None else None
    sections = held["sections"]

    def before_commit(staged, models, shards) -> dict:
        return {**sections, **(evaluate(staged, models, shards) if evaluate is not None else {})}

    hooks.before_commit = before_commit if sections or evaluate else None
    result = finalize_split(request, held["split"], records_for(store).results(job_id), settings, hooks)
    out = {"uri": result.output_uri, "manifest_uri": result.manifest_uri,
           "files": [f.to_dict() for f in result.files], "stats": result.stats, **result.checks}
    progress = _progress({"all": {"bytes_written": held["split"]["output_bytes"],
                                  "tensors_done": held["split"]["tensors"],
                                  "bytes_read": result.stats.get("bytes_read", 0)}}, held["split"], Phase.DONE)
    progress["eta_seconds"] = 0.0
    return succeed(store, job_id, record, kind, out, settings, progress, time.monotonic() - t0)


def _end(store: JobStore, job_id: str, task: str | None, tenant: str, settings: Settings) -> None:
    """A task is over (None: a copy of a task queued outside the records, which counts nothing)."""
    try:
        if task is not None:
            records_for(store).ended(job_id, task, tenant)
        pump(store.r, settings)
        settle(store, job_id, settings)
    except REDIS_DOWN:
        pass  # the monitor settles the job once Redis is back


def on_task_failure(job, connection, exc_type, exc_value, tb) -> None:
    """A task raised (a storage error past the engine's retries) or its process died (the monitor expired its
    execution): RQ queues it again while it has retries left; past them the job fails."""
    from worker.service.jobs import _wait, store_for

    settings = get_settings()
    store = store_for(settings, connection)
    job_id, task = job.args
    lost = exc_type.__name__ == "AbandonedJobError"
    reason = "worker lost" if lost else f"{exc_type.__name__}: {exc_value}"
    if job.retries_left and _wait(settings, "a task's retry", store.status, job_id) in ACTIVE:
        store.add_event(job_id, "task_retry", task=task, reason=reason, retries_left=job.retries_left)
        return
    held = records_for(store).load(job_id)
    error = {"code": "worker_lost" if lost else "internal_error", "message": f"task {task}: {reason}"}
    store.request_cancel(job_id)
    _wait(settings, "a job's end", store.transition, job_id, ACTIVE, "failed", finished_at=now_iso(), error=error,
          event={"type": "finished", "status": "failed", "error": error})
    if held is not None:
        _end(store, job_id, task, held["tenant"], settings)


# --- settling: a cancelled or failed split leaves nothing ---------------------------------------------------

def settle(store: JobStore, job_id: str, settings: Settings) -> None:
    """A split job that is cancelling or has ended: its waiting tasks are dropped, queued ones taken off RQ,
    and once none runs, what its tasks wrote is removed (a failed or cancelled job) and a cancel is recorded
    as done; a succeeded job's task records go."""
    records = records_for(store)
    held = records.load(job_id)
    status = store.status(job_id)
    if held is None or status is None or (status in ACTIVE and status != "cancelling"):
        return
    if status == "succeeded":
        records.remove(job_id)
        return
    records.drop_pending(job_id)
    for task in records.active(job_id):
        _drop_queued(store, records, job_id, task, held["tenant"])
    if records.active(job_id):
        return
    if not held["discarded"]:
        _discard(store, job_id, settings)
        records.mark_discarded(job_id)
    if status == "cancelling":
        store.transition(job_id, ("cancelling",), "cancelled", finished_at=now_iso(),
                         event={"type": "finished", "status": "cancelled"})
    records.remove(job_id)


def _drop_queued(store: JobStore, records: TaskRecords, job_id: str, task: str, tenant: str) -> None:
    try:
        rq_job = Job.fetch(task_id(job_id, task), connection=store.r)
    except Exception:
        return
    if rq_job.get_status() in ("queued", "deferred", "scheduled"):
        rq_job.cancel()
        records.ended(job_id, task, tenant)


def _discard(store: JobStore, job_id: str, settings: Settings) -> None:
    from worker.engine.pipeline.shards import discard_split
    from worker.service.jobs import prepare

    record = store.get(job_id)
    try:
        _kind, request, _spec = prepare(store, job_id, record, settings)
        discard_split(request, settings)
        store.add_event(job_id, "output_discarded")
    except GraftError as err:
        log.warning("job %s: what its tasks wrote could not be removed: %s", job_id, err.message)
        store.add_event(job_id, "warning", code="discard_failed", message=err.message)

