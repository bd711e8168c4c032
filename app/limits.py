"""Per-tenant limits kept in Redis, so that every API process enforces the same ones: a token bucket on the
requests that cost work (job submissions and previews), and a cap on a tenant's unfinished jobs."""

from __future__ import annotations

import math

import redis

from worker.service.job_store import JobStore
from worker.service.settings import Settings

from .problems import Problem

# Token bucket on the server's clock (TIME), so API processes on several hosts agree. Returns
# {allowed (1/0), seconds until one token is back (a string: Lua numbers become integers)}.
_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring((1 - tokens) / rate)}
"""


class TenantLimits:
    def __init__(self, conn: redis.Redis, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self._bucket = conn.register_script(_BUCKET)

    def take(self, tenant: str) -> None:
        """One unit of the tenant's request rate, or 429 with the seconds until the next one."""
        per_minute = self.settings.tenant_rate_per_minute
        if per_minute <= 0:
            return
        allowed, wait = self._bucket(keys=[f"{self.store.p}rate:{tenant}"],
                                     args=[per_minute / 60.0, max(1, self.settings.tenant_rate_burst)])
        if not int(allowed):
            retry = max(1, math.ceil(float(wait)))
            raise Problem(429, "rate_limited", f"too many requests for this tenant (limit "
                          f"{per_minute:g} a minute, burst {self.settings.tenant_rate_burst}); retry in {retry} s",
                          headers={"Retry-After": str(retry)})

    def too_many_jobs(self, tenant: str) -> Problem:
        """The refusal of a job over the tenant's cap of unfinished ones (JobStore.create counts atomically)."""
        cap = self.settings.tenant_max_unfinished_jobs
        retry = str(max(1, self.settings.retry_after_seconds * 5))
        return Problem(429, "too_many_jobs", f"tenant {tenant} has {cap} unfinished jobs, its limit; wait for some "
                       "to finish or cancel them", headers={"Retry-After": retry})
