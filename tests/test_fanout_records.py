"""The split's bookkeeping (worker/service/fanout.py, task_records.py, monitor.py) against a real Redis, with no
worker: a job created while the pump takes its tenant out of the ring is still queued; the pump frees only its
own lock; a finalize that nobody queued, or a task recorded queued whose RQ job is missing, is queued again; a
task whose RQ job finished or vanished with its record left frees its slot and lets a failed split settle."""

from __future__ import annotations

import uuid

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from worker.service import fanout
from worker.service.job_store import JobStore, new_job_id, now_iso
from worker.service.monitor import Monitor
from worker.service.settings import Settings
from worker.service.task_records import FINAL, TaskRecords, task_id


@pytest.fixture
def env(redis_url):
    conn = redis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:10]
    settings = Settings(key_prefix=f"test-fanout-{tag}:", queue_name=f"test-fanout-{tag}", lease_seconds=2,
                        max_attempts=1, shard_queued_per_tenant=2)
    store = JobStore(conn, settings.key_prefix)
    jobs: list[str] = []
    try:
        yield conn, settings, store, jobs
    finally:
        keys = list(conn.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        for job_id in jobs:
            keys += list(conn.scan_iter(match=f"rq:job:{job_id}-*"))
        keys += list(conn.scan_iter(match=f"rq:*:{settings.queue_name}"))
        if keys:
            conn.delete(*keys)
        conn.close()


def _split_job(env, tenant: str = "alpha", shards: int = 3, parallelism: int = 3, status: str = "running") -> str:
    conn, settings, store, jobs = env
    job_id = new_job_id()
    jobs.append(job_id)
    store.create({"id": job_id, "object": "graft.job", "status": status, "created_at": now_iso(),
                  "webhook_url": None}, tenant)
    split = {"shards": [{"index": i} for i in range(shards)], "output_bytes": 100, "input_bytes": 100, "tensors": 3}
    assert TaskRecords(conn, settings.key_prefix).create(job_id, split, tenant, parallelism, {})
    return job_id


def _rq_ids(env) -> list[str]:
    conn, settings, _, _ = env
    return Queue(settings.queue_name, connection=conn).job_ids


def test_a_job_created_while_its_tenant_leaves_the_ring_is_queued(env, monkeypatch):
    conn, settings, _, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    first = _split_job(env, shards=1)
    real = fanout._pump_tenant
    late: list[str] = []

    def racing(conn_, records_, tenant, settings_):
        got = real(conn_, records_, tenant, settings_)
        if got is None and not late:  # between "nothing waiting" and taking the tenant out of the ring
            late.append(_split_job(env, shards=1))
        return got

    monkeypatch.setattr(fanout, "_pump_tenant", racing)
    assert fanout.pump(conn, settings) == 2
    assert late and sorted(_rq_ids(env)) == sorted([task_id(first, "s0"), task_id(late[0], "s0")])
    assert records.pending_count(late[0]) == 0
    assert conn.lrange(records.ring_key, 0, -1) == [], "with nothing waiting, the tenant leaves the ring"


def test_leave_ring_keeps_a_tenant_with_a_task_waiting(env):
    conn, settings, _, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    _split_job(env, tenant="beta", shards=2)
    assert not records.leave_ring("beta")
    assert conn.lrange(records.ring_key, 0, -1) == [b"beta"]
    assert records.leave_ring("nobody")


def test_the_pump_frees_only_its_own_lock(env, monkeypatch):
    conn, settings, _, _ = env
    lock = f"{settings.key_prefix}split:pump"
    _split_job(env, shards=1)
    real = fanout._pump_tenant

    def outlived(*args):  # this pump's lock expired mid-pass and another caller took it
        conn.set(lock, b"theirs", px=60_000)
        return real(*args)

    monkeypatch.setattr(fanout, "_pump_tenant", outlived)
    fanout.pump(conn, settings)
    assert conn.get(lock) == b"theirs"
    monkeypatch.setattr(fanout, "_pump_tenant", real)
    assert fanout.pump(conn, settings) == 0, "held by the other caller"
    conn.delete(lock)
    fanout.pump(conn, settings)
    assert conn.get(lock) is None, "a pump frees its own lock"


def test_finalize_nobody_queued_is_queued_once(env):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=2)
    for i in range(2):  # both written; the completing task died before queueing finalize
        records.shard_written(job_id, i, {"index": i}, 2)
    assert fanout.queue_final_if_due(store, job_id, settings)
    assert _rq_ids(env) == [task_id(job_id, FINAL)] and FINAL in records.active(job_id)
    assert not fanout.queue_final_if_due(store, job_id, settings), "it has an RQ job now"
    assert _rq_ids(env) == [task_id(job_id, FINAL)]
    assert [e["task"] for e in store.events(job_id) if e["type"] == "task_requeued"] == [FINAL]


def test_finalize_is_not_due_before_every_shard_or_when_cancelling(env):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=2)
    records.shard_written(job_id, 0, {"index": 0}, 2)
    assert not fanout.queue_final_if_due(store, job_id, settings)
    records.shard_written(job_id, 1, {"index": 1}, 2)
    store.transition(job_id, ("running",), "cancelling")
    assert not fanout.queue_final_if_due(store, job_id, settings)
    assert _rq_ids(env) == []


def test_the_claim_keeps_two_callers_from_queueing_finalize_twice(env):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=1)
    records.shard_written(job_id, 0, {"index": 0}, 1)
    conn.set(fanout._claim_key(settings, job_id, FINAL), b"1", px=60_000)  # the completing task is queueing it
    assert not fanout.queue_final_if_due(store, job_id, settings)
    assert _rq_ids(env) == []


def test_monitor_requeues_a_recorded_task_without_an_rq_job_and_finalize(env):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=3)
    for task in ("s0", "s1"):  # recorded queued; Redis failed before they reached RQ
        records.take_pending(job_id)
        records.queued(job_id, task, "alpha")
    records.shard_written(job_id, 1, {"index": 1}, 3)  # s1 did run: its RQ job expired, its record stayed
    Monitor(conn, settings)._look_after_split(job_id, judge=True)
    assert _rq_ids(env) == [task_id(job_id, "s0")]
    assert records.active(job_id) == {"s0"}, "s1's slot is free"
    assert not conn.sismember(records.tenant_queued_key("alpha"), task_id(job_id, "s1"))


def test_monitor_frees_the_slot_of_a_finished_task(env):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=2, parallelism=1)
    assert fanout.pump(conn, settings) == 1
    rq_job = Job.fetch(task_id(job_id, "s0"), connection=conn)
    rq_job.set_status(JobStatus.FINISHED)  # run_task returned; its _end hit a Redis outage
    records.shard_written(job_id, 0, {"index": 0}, 2)
    Monitor(conn, settings)._look_after_split(job_id, judge=True)
    assert records.active(job_id) == set()
    assert fanout.pump(conn, settings) == 1, "the next shard takes the freed slot"
    assert task_id(job_id, "s1") in _rq_ids(env)


@pytest.mark.parametrize("status", ["failed", "cancelling"])
def test_a_split_whose_lost_task_left_its_record_settles(env, monkeypatch, status):
    conn, settings, store, _ = env
    records = TaskRecords(conn, settings.key_prefix)
    job_id = _split_job(env, shards=2, status=status)
    records.take_pending(job_id)
    records.queued(job_id, "s0", "alpha")  # its RQ job is gone
    discarded: list[str] = []
    monkeypatch.setattr(fanout, "_discard", lambda store_, job, settings_: discarded.append(job))
    Monitor(conn, settings)._look_after_split(job_id, judge=True)
    assert discarded == [job_id] and _rq_ids(env) == []
    assert records.load(job_id) is None and job_id not in records.split_ids()
    assert store.status(job_id) == ("failed" if status == "failed" else "cancelled")


_RACED: list[str] = []


def _cleanup_racing_the_expiry(job, connection, exc_type, exc_value, tb) -> None:
    """A failure callback that, on its first call, runs what every worker runs as it starts: RQ's registry
    cleanup of the same queue, at the moment the monitor's own clean-up of the entry is under way."""
    from rq.registry import clean_registries

    _RACED.append(job.id)
    if len(_RACED) == 1:
        clean_registries(Queue(job.origin, connection=connection))


def test_a_lapsed_execution_is_retried_once_when_a_worker_cleans_up_beside_the_monitor(env):
    """The monitor expires a dead task's RQ execution while a new worker's registry cleanup runs: the task is
    queued again once, and its failure callback runs once (not a second start of the same shard)."""
    from rq import Callback, Retry
    from rq.registry import StartedJobRegistry

    conn, settings, _, jobs = env
    _RACED.clear()
    queue = Queue(settings.queue_name, connection=conn)
    job = queue.enqueue("builtins.len", [], retry=Retry(max=3), on_failure=Callback(_cleanup_racing_the_expiry))
    jobs.append(job.id.split("-")[0])
    conn.lrem(queue.key, 0, job.id)  # taken by a worker, which then died mid-task
    job.set_status(JobStatus.STARTED)
    registry = StartedJobRegistry(settings.queue_name, connection=conn)
    member = f"{job.id}:execution-1".encode()
    conn.zadd(registry.key, {member: 10**10})
    Monitor(conn, settings)._expire([member])
    assert [job.id] == _RACED, "the failure callback ran once"
    assert queue.job_ids.count(job.id) == 1, "queued again exactly once"
    assert Job.fetch(job.id, connection=conn).retries_left == 2
    assert conn.zcard(registry.key) == 0 and not list(conn.scan_iter(match=f"{registry.key}:reaping:*"))
