"""Prompt recovery and hard cancels, run as a thread in every worker parent.

RQ notices a dead work horse only when the StartedJobRegistry entry expires (job_monitoring_interval +
60 s). Our job process renews a short lease instead (worker/service/jobs.py); when a running job's lease lapses,
the monitor expires that one RQ execution now and runs RQ's own registry cleanup, which raises
AbandonedJobError through the failure callback and consumes one Retry (re-queueing the job) or fails it.

A lease also lapses when Redis is unreachable for longer than the lease (nobody can renew it, and Redis
expiries are wall-clock), so leases are judged only once Redis has answered this monitor without a break for a
full lease period: by then every live job process has renewed its lease. The fence (GraftSuperseded) still
stops an attempt taken for dead that lived on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime

import redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from worker.service import fanout
from worker.service.job_store import JobStore, now_iso
from worker.service.outage import OUTAGE, REDIS_DOWN, Backoff
from worker.service.settings import Settings
from worker.service.task_records import TaskRecords, task_id

log = logging.getLogger("graft.monitor")

# Moves each execution entry from the started registry (KEYS[1]) to a private one (KEYS[2]) scored 1, only if
# this call is the one that removes it: of concurrent claimers exactly one gets each entry.
_CLAIM_EXECUTIONS = """
local moved = 0
for _, member in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('ZADD', KEYS[2], 1, member)
    moved = moved + 1
  end
end
return moved
"""


class Monitor(threading.Thread):
    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        super().__init__(daemon=True, name="graft-monitor")
        self.conn = conn
        self.settings = settings
        self.store = JobStore(conn, settings.key_prefix)
        self.tasks = TaskRecords(conn, settings.key_prefix)
        self.queue = Queue(settings.queue_name, connection=conn)
        self.stop = threading.Event()
        self._cancelling_since: dict[str, float] = {}
        self._reachable_since: float | None = None  # monotonic time of the first tick after the last outage
        self._claim = conn.register_script(_CLAIM_EXECUTIONS)

    def run(self) -> None:
        backoff = Backoff(self.settings.redis_retry_max)
        delay = self.settings.monitor_interval
        while not self.stop.wait(delay):
            delay = self.settings.monitor_interval
            try:
                self.tick()
            except REDIS_DOWN as exc:
                self._reachable_since = None
                OUTAGE.down("the recovery monitor", exc)
                delay = backoff.next()
                continue
            except Exception:  # never let the monitor die; the next tick tries again
                log.exception("monitor tick failed")
            OUTAGE.up()
            backoff.reset()

    def judges_leases(self) -> bool:
        """True once Redis has answered for a full lease period since this monitor last found it unreachable."""
        now = time.monotonic()
        if self._reachable_since is None:
            self._reachable_since = now
        return now - self._reachable_since >= self.settings.lease_seconds

    def tick(self) -> None:
        self.conn.ping()  # an outage shows here, before anything is judged
        judge = self.judges_leases()
        split = set(self.tasks.split_ids())
        for job_id in split:
            self._look_after_split(job_id, judge)
        if split:
            fanout.pump(self.conn, self.settings)
        for status in ("validating", "running", "committing", "cancelling"):
            ids = self.store.ids_with_status(status)
            if status == "cancelling":  # forget jobs that left cancelling before their grace ran out
                for gone in set(self._cancelling_since) - set(ids):
                    self._cancelling_since.pop(gone, None)
            for job_id in ids:
                if job_id in split:  # its tasks hold leases of their own (above)
                    continue
                if status == "cancelling":
                    self._escalate_cancel(job_id)
                if judge and not self.store.lease_alive(job_id):
                    self._recover(job_id)

    def _recover(self, job_id: str) -> None:
        # One monitor per job at a time, across all workers.
        if not self.conn.set(f"{self.settings.key_prefix}recover:{job_id}", b"1", nx=True,
                             px=int(self.settings.lease_seconds * 1000)):
            return
        if self.store.lease_alive(job_id):
            return
        try:
            job = Job.fetch(job_id, connection=self.conn)
        except NoSuchJobError:
            job = None
        rq_status = job.get_status() if job is not None else None
        if job is None or rq_status != JobStatus.STARTED or job.origin != self.queue.name:
            # RQ forgot it (e.g. Redis lost its keys), or RQ ended it without our callback: a work horse killed
            # while its worker lives (OOM killer, segfault) on its last attempt is failed by RQ's
            # handle_job_failure, which runs no failure callback. Nothing will touch the record again.
            if job is None or rq_status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.FINISHED,
                                            JobStatus.CANCELED):
                message = "the job vanished from the queue" if job is None else "the job's process died"
                if self.store.transition(job_id, ("cancelling",), "cancelled", finished_at=now_iso(),
                                         event={"type": "finished", "status": "cancelled", "worker_lost": True}):
                    return
                error = {"code": "worker_lost", "message": message}
                self.store.transition(job_id, ("validating", "running", "committing"), "failed",
                                      finished_at=now_iso(), error=error,
                                      event={"type": "finished", "status": "failed", "error": error})
            return
        if self.store.status(job_id) == "cancelling":
            self.store.transition(job_id, ("cancelling",), "cancelled", finished_at=now_iso(),
                                  event={"type": "finished", "status": "cancelled", "worker_lost": True})
        members = self._executions(job_id)
        if not members:
            return
        log.warning("job %s: its process died; expiring its RQ execution now", job_id)
        self.store.add_event(job_id, "worker_lost")
        self._expire(members)

    def _executions(self, rq_id: str) -> list[bytes]:
        """The StartedJobRegistry entries ({job id}:{execution id}) of one RQ job."""
        registry = StartedJobRegistry(self.queue.name, connection=self.conn)
        return [m for m in self.conn.zrange(registry.key, 0, -1) if m.decode().startswith(f"{rq_id}:")]

    def _expire(self, members: list[bytes]) -> None:
        """RQ's own clean-up of these executions now: AbandonedJobError through the failure callback, which
        consumes one Retry (the job or task is queued again) or fails it.

        The entries are first moved, atomically, out of the queue's StartedJobRegistry into a registry key of
        this call's own, and cleaned up there. Marking them expired in place let any worker's registry cleanup
        (every worker runs one as it starts) see the same entries between the mark and our clean-up: both ran
        the failure callback and RQ's retry, and the task was queued, and run, twice."""
        # The failure callback runs in this (non-main) thread: SIGALRM timeouts only work in the main one.
        registry = StartedJobRegistry(self.queue.name, connection=self.conn, death_penalty_class=TimerDeathPenalty)
        started_key = registry.key
        registry.key = f"{started_key}:reaping:{uuid.uuid4().hex}"
        try:
            moved = self._claim(keys=[started_key, registry.key], args=members)
            if moved:  # an entry another monitor or RQ took first is theirs to clean up
                registry.cleanup(timestamp=2)  # scored 1 by the claim
        finally:
            self.conn.delete(registry.key)

    def _look_after_split(self, job_id: str, judge: bool) -> None:
        """A split job (fanout.py): a running task whose lease lapsed is expired (RQ's retry queues it again:
        one shard's work is lost, not the job's); a task RQ ended without our callback fails the job; a task
        whose RQ job finished or vanished with its record left (its end hit a Redis outage) is cleared, or queued
        again if it never ran; a finalize nobody queued is queued; a job cancelling or ended is settled once no
        task runs."""
        if judge:
            fanout.queue_final_if_due(self.store, job_id, self.settings)
        for task in self.tasks.active(job_id):
            rq_id = task_id(job_id, task)
            if not judge or self.store.lease_alive(rq_id):
                continue
            try:
                rq_job = Job.fetch(rq_id, connection=self.conn)
                status = rq_job.get_status()
            except NoSuchJobError:
                fanout.requeue_missing(self.store, job_id, task, self.settings)
                continue
            if status == JobStatus.FINISHED:  # run_task returned, so its own end failed: the slot is free
                self.tasks.ended(job_id, task, (self.tasks.load(job_id) or {}).get("tenant", ""))
            elif status == JobStatus.STARTED:
                # RQ says started as it forks the work horse, before the task could take its lease: judged only
                # once the lease had time to be taken.
                since = rq_job.started_at.replace(tzinfo=UTC) if rq_job.started_at is not None else None
                if since is None or (datetime.now(UTC) - since).total_seconds() < self.settings.lease_seconds:
                    continue
                if not self.conn.set(f"{self.settings.key_prefix}recover:{rq_id}", b"1", nx=True,
                                     px=int(self.settings.lease_seconds * 1000)):
                    continue
                members = self._executions(rq_id)
                if members and not self.store.lease_alive(rq_id):
                    log.warning("job %s: task %s's process died; expiring its RQ execution now", job_id, task)
                    self.store.add_event(job_id, "worker_lost", task=task)
                    self._expire(members)
            elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                error = {"code": "worker_lost", "message": f"task {task}: its process died"}
                self.store.request_cancel(job_id)
                self.store.transition(job_id, ("validating", "running", "committing"), "failed",
                                      finished_at=now_iso(), error=error,
                                      event={"type": "finished", "status": "failed", "error": error})
                self.tasks.ended(job_id, task, (self.tasks.load(job_id) or {}).get("tenant", ""))
        fanout.settle(self.store, job_id, self.settings)

    def _escalate_cancel(self, job_id: str) -> None:
        first = self._cancelling_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - first < self.settings.cancel_grace_seconds:
            return
        self._cancelling_since.pop(job_id, None)
        try:
            send_stop_job_command(self.conn, job_id)
            self.store.add_event(job_id, "stop_sent")
        except Exception as exc:  # not running on any worker any more
            log.info("stop of %s: %s", job_id, exc)
