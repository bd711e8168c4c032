"""Our own records of a split graft's tasks (worker/service/fanout.py), beside the job's record in Redis.

RQ delivers each task; these records say what is left to queue, what is queued or running, which shards are
written and what each wrote, so that the job stays one job (its status, progress and events) whatever
happens to its tasks.

Layout (every key starts with `settings.key_prefix`):
- `job:<id>:split`          hash: `split` (the stored plan, pipeline/shards.py), `tenant`, `parallelism`,
                            `sections` (manifest sections decided before the split: a preflight), `discarded`
- `job:<id>:tasks:pending`  list of tasks not queued yet (`s<index>`), taken from the left
- `job:<id>:tasks:active`   set of tasks queued on RQ or running (what `parallelism` counts)
- `job:<id>:tasks:done`     set of shard indexes written; `job:<id>:tasks:results` hash index -> what it wrote
- `job:<id>:tasks:progress` hash task -> its progress (summed into the job's)
- `job:<id>-<task>:lease`   the running task's lease (JobStore.renew_lease with the task's RQ id)
- `splits`                  set of the jobs split and not yet settled (what the monitor looks after)
- `split:tenants`           list of tenants with tasks to queue: the round-robin ring
- `split:tenant:<t>:jobs`   list of that tenant's jobs with tasks to queue, oldest first
- `split:tenant:<t>:queued` set of the tenant's task ids queued on RQ and not started (capped per tenant)
- `queueing:<task id>`      a short claim while a task is being recorded queued and put on RQ (fanout.py)
- `split:pump`              the pump's lock (its value the holder's token)
"""

from __future__ import annotations

import orjson
import redis

TASK_SHARD = "s"
FINAL = "final"


def shard_task(index: int) -> str:
    return f"{TASK_SHARD}{index}"


def task_id(job_id: str, task: str) -> str:
    """The task's RQ job id (its lease key follows from it)."""
    return f"{job_id}-{task}"


class TaskRecords:
    def __init__(self, conn: redis.Redis, prefix: str = "graft:") -> None:
        self.r = conn
        self.p = prefix

    def key(self, job_id: str, what: str) -> str:
        return f"{self.p}job:{job_id}:{what}"

    @property
    def splits_key(self) -> str:
        return f"{self.p}splits"

    @property
    def ring_key(self) -> str:
        return f"{self.p}split:tenants"

    def tenant_jobs_key(self, tenant: str) -> str:
        return f"{self.p}split:tenant:{tenant}:jobs"

    def tenant_queued_key(self, tenant: str) -> str:
        return f"{self.p}split:tenant:{tenant}:queued"

    def create(self, job_id: str, split: dict, tenant: str, parallelism: int, sections: dict) -> bool:
        """The split's records in one transaction; False when they exist already (a retried planning task)."""
        key = self.key(job_id, "split")
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, self.ring_key)
                    if pipe.exists(key):
                        pipe.unwatch()
                        return False
                    in_ring = tenant.encode() in pipe.lrange(self.ring_key, 0, -1)
                    pipe.multi()
                    pipe.hset(key, mapping={"split": orjson.dumps(split), "tenant": tenant,
                                            "parallelism": parallelism, "sections": orjson.dumps(sections)})
                    pipe.rpush(self.key(job_id, "tasks:pending"),
                               *[shard_task(i) for i in range(len(split["shards"]))])
                    pipe.sadd(self.splits_key, job_id)
                    pipe.rpush(self.tenant_jobs_key(tenant), job_id)
                    if not in_ring:
                        pipe.rpush(self.ring_key, tenant)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def leave_ring(self, tenant: str) -> bool:
        """Take the tenant out of the ring if none of its jobs has a task waiting; False (it stays) when one has.
        One transaction with the check: `create` adds a job and rings the tenant only if it is not in the ring,
        so a job created between a separate check and removal would never be queued."""
        jobs_key = self.tenant_jobs_key(tenant)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(jobs_key, self.ring_key)  # `create` writes both; pending lists only shrink otherwise
                    jobs = [j.decode() for j in pipe.lrange(jobs_key, 0, -1)]
                    if any(pipe.llen(self.key(j, "tasks:pending")) for j in jobs):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.lrem(self.ring_key, 0, tenant)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def is_split(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id, "split")))

    def load(self, job_id: str) -> dict | None:
        raw = self.r.hgetall(self.key(job_id, "split"))
        if not raw:
            return None
        raw = {k.decode(): v for k, v in raw.items()}
        return {"split": orjson.loads(raw["split"]), "tenant": raw["tenant"].decode(),
                "parallelism": int(raw["parallelism"]), "sections": orjson.loads(raw["sections"]),
                "discarded": "discarded" in raw}

    def split_ids(self) -> list[str]:
        return [i.decode() for i in self.r.smembers(self.splits_key)]

    def active(self, job_id: str) -> set[str]:
        return {t.decode() for t in self.r.smembers(self.key(job_id, "tasks:active"))}

    def queued(self, job_id: str, task: str, tenant: str | None) -> None:
        """`task` is on RQ now (counted against the job's parallelism and, unless None, its tenant's cap)."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(self.key(job_id, "tasks:active"), task)
            if tenant is not None:
                pipe.sadd(self.tenant_queued_key(tenant), task_id(job_id, task))
            pipe.execute()

    def started(self, job_id: str, task: str, tenant: str) -> None:
        self.r.srem(self.tenant_queued_key(tenant), task_id(job_id, task))

    def ended(self, job_id: str, task: str, tenant: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.srem(self.key(job_id, "tasks:active"), task)
            pipe.srem(self.tenant_queued_key(tenant), task_id(job_id, task))
            pipe.execute()

    def shard_written(self, job_id: str, index: int, result: dict, shards: int) -> bool:
        """Record a shard's result; True for exactly one call: the one that completed the set (a duplicated or
        retried task records the same shard again and completes nothing)."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job_id, "tasks:results"), str(index), orjson.dumps(result))
            pipe.sadd(self.key(job_id, "tasks:done"), index)
            pipe.scard(self.key(job_id, "tasks:done"))
            _, added, count = pipe.execute()
        return bool(added) and count == shards

    def results(self, job_id: str) -> list[dict]:
        return [orjson.loads(v) for v in self.r.hvals(self.key(job_id, "tasks:results"))]

    def is_done(self, job_id: str, index: int) -> bool:
        return bool(self.r.sismember(self.key(job_id, "tasks:done"), index))

    def done_count(self, job_id: str) -> int:
        return int(self.r.scard(self.key(job_id, "tasks:done")))

    def set_progress(self, job_id: str, task: str, doc: dict) -> dict[str, dict]:
        """Store one task's progress; returns every task's."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(job_id, "tasks:progress"), task, orjson.dumps(doc))
            pipe.hgetall(self.key(job_id, "tasks:progress"))
            _, raw = pipe.execute()
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}

    def take_pending(self, job_id: str) -> str | None:
        task = self.r.lpop(self.key(job_id, "tasks:pending"))
        return task.decode() if task is not None else None

    def pending_count(self, job_id: str) -> int:
        return int(self.r.llen(self.key(job_id, "tasks:pending")))

    def drop_pending(self, job_id: str) -> None:
        self.r.delete(self.key(job_id, "tasks:pending"))

    def mark_discarded(self, job_id: str) -> None:
        self.r.hset(self.key(job_id, "split"), "discarded", 1)

    def remove(self, job_id: str) -> None:
        """A settled job's task records (its job record keeps the outcome)."""
        tenant = self.r.hget(self.key(job_id, "split"), "tenant")
        with self.r.pipeline(transaction=True) as pipe:
            for what in ("split", "tasks:pending", "tasks:active", "tasks:done", "tasks:results", "tasks:progress"):
                pipe.delete(self.key(job_id, what))
            pipe.srem(self.splits_key, job_id)
            if tenant is not None:
                pipe.lrem(self.tenant_jobs_key(tenant.decode()), 0, job_id)
            pipe.execute()
