"""Our own job record in Redis: the single source of truth for a job's status.

RQ only delivers work (its job hashes and results expire); everything a client sees comes from here.

Layout (every key starts with `settings.key_prefix`):
- `job:<id>`            hash; one field per public attribute, each JSON-encoded, plus `tenant` (raw)
- `job:<id>:events`     list of JSON events, oldest first
- `job:<id>:cancel`     flag set when a cancel was asked for (the job polls it between blocks)
- `job:<id>:lease`      refreshed by the running job; its expiry means the process died
- `tenant:<t>:jobs`     sorted set of job ids (all score 0; ids sort by creation time) for pagination
- `tenant:<t>:status:<s>` the same, per status: listing by status and counting a tenant's unfinished jobs
                        without reading its records (kept in the transactions that create and move jobs)
- `status:<s>`          set of job ids per status (exact "jobs by status" metrics)
- `idem:<t>:<sha>`      Idempotency-Key -> {"body": sha256 of the body, "job": id}
- `webhooks`            sorted set of pending webhook deliveries, scored by due time
- `stats`               hash of counters: bytes/tensors processed, job duration histogram buckets
- `meta`                hash of layout versions (`tenant_status_index`: the per-tenant status sets are complete)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import orjson
import redis

from worker.service.statuses import ACTIVE, STATUSES, TERMINAL, UNFINISHED

__all__ = ["ACTIVE", "STATUSES", "TERMINAL", "UNFINISHED", "JobStore", "decode_job", "new_job_id", "now_iso"]
# Order of the public document's fields (GET /v1/jobs/{id}).
PUBLIC_FIELDS = ("id", "object", "kind", "checks", "status", "created_at", "started_at", "finished_at",
                 "source_base", "source_finetuned", "diff", "target_base", "output", "options", "recipe", "metadata",
                 "webhook_url", "attempt", "max_attempts", "progress", "result", "error", "deleted_at")
# Kept in the record for the worker, not shown: a job's full checks (a probe text may be 64 KiB).
CHECKS_SPEC = "checks_spec"
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
MAX_EVENTS = 1000
STATUS_INDEX_VERSION = b"1"
# Puts each given job (ARGV[2..]) in its tenant's set for the status its record holds now, and out of the
# others: atomic per batch, so it cannot undo a transition that commits while a backfill runs.
_INDEX_JOBS = """
local p, statuses = ARGV[1], {STATUSES}
for i = 2, #ARGV do
  local id = ARGV[i]
  local held = redis.call('HMGET', p .. 'job:' .. id, 'status', 'tenant')
  if held[1] and held[2] then
    local current, base = cjson.decode(held[1]), p .. 'tenant:' .. held[2] .. ':status:'
    for _, s in ipairs(statuses) do
      if s ~= current then redis.call('ZREM', base .. s, id) end
    end
    redis.call('ZADD', base .. current, 0, id)
  end
end
return #ARGV - 1
""".replace("STATUSES", ", ".join(f"'{s}'" for s in STATUSES))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Fixed-width, time-ordered ids: lexical order is creation order, which pagination relies on."""
    return f"job_{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def _dumps(value) -> bytes:
    return orjson.dumps(value)


def decode_job(raw: dict) -> dict | None:
    """Redis hash (bytes -> bytes) to the public document; None for a missing record."""
    if not raw:
        return None
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    return {name: orjson.loads(fields[name]) for name in PUBLIC_FIELDS if name in fields}


class JobStore:
    """Synchronous access to job records (worker processes and the API's non-hot paths)."""

    def __init__(self, conn: redis.Redis, prefix: str = "graft:") -> None:
        self.r = conn
        self.p = prefix

    # keys
    def job_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:events"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:cancel"

    def lease_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:lease"

    def tenant_key(self, tenant: str) -> str:
        return f"{self.p}tenant:{tenant}:jobs"

    def status_key(self, status: str) -> str:
        return f"{self.p}status:{status}"

    def tenant_status_key(self, tenant: str, status: str) -> str:
        return f"{self.p}tenant:{tenant}:status:{status}"

    def idem_key(self, tenant: str, digest: str) -> str:
        return f"{self.p}idem:{tenant}:{digest}"

    @property
    def webhooks_key(self) -> str:
        return f"{self.p}webhooks"

    @property
    def stats_key(self) -> str:
        return f"{self.p}stats"

    @property
    def meta_key(self) -> str:
        return f"{self.p}meta"

    # records
    def create(self, doc: dict, tenant: str, *, max_unfinished: int | None = None) -> bool:
        """Write a new job record and its index entries in one transaction.

        With `max_unfinished`, only while the tenant has fewer unfinished jobs than that (counted and created
        in the same transaction, so racing submissions cannot overshoot); False when refused."""
        unfinished = [self.tenant_status_key(tenant, s) for s in UNFINISHED]
        with self.r.pipeline() as pipe:
            while True:
                try:
                    if max_unfinished is not None:
                        pipe.watch(*unfinished)  # from here until multi(), commands run at once
                        if sum(pipe.zcard(key) for key in unfinished) >= max_unfinished:
                            pipe.unwatch()
                            return False
                        pipe.multi()
                    self._queue_create(pipe, doc, tenant)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def _queue_create(self, pipe: redis.client.Pipeline, doc: dict, tenant: str) -> None:
        pipe.hset(self.job_key(doc["id"]), mapping={**{k: _dumps(v) for k, v in doc.items()}, "tenant": tenant})
        pipe.zadd(self.tenant_key(tenant), {doc["id"]: 0})
        pipe.zadd(self.tenant_status_key(tenant, doc["status"]), {doc["id"]: 0})
        pipe.sadd(self.status_key(doc["status"]), doc["id"])
        pipe.rpush(self.events_key(doc["id"]), _dumps({"at": doc["created_at"], "type": "queued"}))

    def get(self, job_id: str) -> dict | None:
        return decode_job(self.r.hgetall(self.job_key(job_id)))

    def checks_spec(self, job_id: str) -> dict:
        """A job's full checks (evaluate with its probe text, a sweep's alphas, a preflight's level): the
        worker's, not part of the public document."""
        value = self.r.hget(self.job_key(job_id), CHECKS_SPEC)
        return orjson.loads(value) if value else {}

    def tenant_of(self, job_id: str) -> str | None:
        value = self.r.hget(self.job_key(job_id), "tenant")
        return value.decode() if value is not None else None

    def status(self, job_id: str) -> str | None:
        value = self.r.hget(self.job_key(job_id), "status")
        return orjson.loads(value) if value is not None else None

    def update(self, job_id: str, **fields) -> None:
        """Fields that do not decide anything (progress, attempt): written without a transaction."""
        self.r.hset(self.job_key(job_id), mapping={k: _dumps(v) for k, v in fields.items()})

    def transition(self, job_id: str, allowed_from: Iterable[str], to: str, event: dict | None = None,
                   also: Callable[[redis.client.Pipeline, str | None], None] | None = None, **fields) -> str | None:
        """Atomically move the job to `to` if its status is one of `allowed_from`.

        Returns the previous status on success and None when the job was elsewhere (another process won a
        race: a cancel against a finish, two workers after a retry). Terminal transitions also queue the
        webhook delivery, in the same transaction, so a webhook is never lost nor sent twice. `also(pipe,
        tenant)` queues more writes of the same transaction (a kind's collection: a diff is listed exactly when
        its extraction is succeeded).
        """
        key = self.job_key(job_id)
        allowed = set(allowed_from)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hmget(key, "status", "webhook_url", "tenant")
                    if raw[0] is None:
                        pipe.unwatch()
                        return None
                    current = orjson.loads(raw[0])
                    if current not in allowed:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, mapping={"status": _dumps(to), **{k: _dumps(v) for k, v in fields.items()}})
                    if current != to:
                        pipe.srem(self.status_key(current), job_id)
                        pipe.sadd(self.status_key(to), job_id)
                        if raw[2] is not None:
                            tenant = raw[2].decode()
                            pipe.zrem(self.tenant_status_key(tenant, current), job_id)
                            pipe.zadd(self.tenant_status_key(tenant, to), {job_id: 0})
                    if event is not None:
                        pipe.rpush(self.events_key(job_id), _dumps({"at": now_iso(), **event}))
                    if also is not None:
                        also(pipe, raw[2].decode() if raw[2] is not None else None)
                    if to in TERMINAL:
                        pipe.delete(self.lease_key(job_id))
                        if raw[1] is not None and orjson.loads(raw[1]):
                            pipe.zadd(self.webhooks_key, {_dumps({"job": job_id, "n": 0, "status": to}): time.time()})
                    pipe.execute()
                    return current
                except redis.WatchError:
                    continue

    def add_event(self, job_id: str, type_: str, **data) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.rpush(self.events_key(job_id), _dumps({"at": now_iso(), "type": type_, **data}))
            pipe.ltrim(self.events_key(job_id), -MAX_EVENTS, -1)
            pipe.execute()

    def events(self, job_id: str) -> list[dict]:
        return [orjson.loads(e) for e in self.r.lrange(self.events_key(job_id), 0, -1)]

    def list_ids(self, tenant: str, after: str | None, count: int, status: str | None = None) -> list[str]:
        """Newest first, strictly older than `after` (the previous page's last id); with `status`, only the
        jobs in that status when read (one index read: no record is scanned)."""
        key = self.tenant_key(tenant) if status is None else self.tenant_status_key(tenant, status)
        upper = f"({after}" if after else "+"
        ids = self.r.zrevrangebylex(key, upper, "-", start=0, num=count)
        return [i.decode() for i in ids]

    def tenant_status_counts(self, tenant: str) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for s in STATUSES:
                pipe.zcard(self.tenant_status_key(tenant, s))
            return dict(zip(STATUSES, pipe.execute(), strict=True))

    def active_count(self, tenant: str) -> int:
        """The tenant's unfinished jobs (queued, validating, running, committing, cancelling)."""
        with self.r.pipeline(transaction=False) as pipe:
            for s in UNFINISHED:
                pipe.zcard(self.tenant_status_key(tenant, s))
            return sum(pipe.execute())

    def backfill_status_index(self, *, force: bool = False, batch: int = 500) -> int:
        """Build the per-tenant status sets for records written before they existed; returns the jobs
        indexed (0 when the version key says it was done). Idempotent and safe beside live transitions;
        run it once every process writing records runs this code (`force` to redo it after old writers
        moved jobs meanwhile). One pass over every job: seconds per 100k jobs."""
        if not force and self.r.hget(self.meta_key, "tenant_status_index") == STATUS_INDEX_VERSION:
            return 0
        script, done = self.r.register_script(_INDEX_JOBS), 0
        for status in STATUSES:
            ids: list[bytes] = []
            for job_id in self.r.sscan_iter(self.status_key(status), count=batch):
                ids.append(job_id)
                if len(ids) >= batch:
                    done += script(args=[self.p, *ids])
                    ids = []
            if ids:
                done += script(args=[self.p, *ids])
        self.r.hset(self.meta_key, "tenant_status_index", STATUS_INDEX_VERSION)
        return done

    def get_many(self, ids: list[str]) -> list[dict | None]:
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            return [decode_job(raw) for raw in pipe.execute()]

    # cancel flag and lease
    def request_cancel(self, job_id: str) -> None:
        self.r.set(self.cancel_key(job_id), b"1", ex=7 * 24 * 3600)

    def controls(self, job_id: str) -> tuple[bool, int]:
        """(cancel requested, current attempt number) in one round trip."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.exists(self.cancel_key(job_id))
            pipe.hget(self.job_key(job_id), "attempt")
            cancel, attempt = pipe.execute()
        return bool(cancel), int(orjson.loads(attempt)) if attempt else 0

    def renew_lease(self, job_id: str, seconds: float) -> None:
        self.r.set(self.lease_key(job_id), b"1", px=int(seconds * 1000))

    def lease_alive(self, job_id: str) -> bool:
        return bool(self.r.exists(self.lease_key(job_id)))

    def ids_with_status(self, status: str) -> list[str]:
        return [i.decode() for i in self.r.smembers(self.status_key(status))]

    def status_counts(self) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for s in STATUSES:
                pipe.scard(self.status_key(s))
            return dict(zip(STATUSES, pipe.execute(), strict=True))

    # metrics kept in Redis so that the API's /metrics sees what every worker did
    def record_finished(self, seconds: float, bytes_read: int, bytes_written: int, tensors: int) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.stats_key, "bytes_read", bytes_read)
            pipe.hincrby(self.stats_key, "bytes_written", bytes_written)
            pipe.hincrby(self.stats_key, "tensors", tensors)
            pipe.hincrbyfloat(self.stats_key, "duration_sum", seconds)
            pipe.hincrby(self.stats_key, "duration_count", 1)
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(self.stats_key, f"le_{bound}", 1)
            pipe.execute()

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.r.hgetall(self.stats_key).items()}
