"""The one settings object: every knob comes from the environment with the GRAFT_ prefix."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from worker.engine.config import EngineSettings


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(EngineSettings):
    """The engine's knobs (worker/engine/config.py, inherited) and the service's."""

    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    api_keys: str = ""
    allowed_roots: str = ""
    output_uri: str = ""
    allowed_buckets: str = ""
    webhook_secret: str = ""
    hf_enabled: bool = True
    dev_mode: bool = False
    queue_name: str = "graft"
    max_attempts: int = 3


    # Service (API, queue worker, job records). Appended by the service work; see app/ and worker/service/jobs.py.
    key_prefix: str = Field("graft:", description="prefix of every Redis key of our own job records")
    progress_interval: float = Field(0.5, description="seconds between progress writes to the job record")
    lease_seconds: float = Field(15.0, description="a running job whose lease is this stale is abandoned")
    monitor_interval: float = Field(1.0, description="seconds between the worker's recovery/cancel checks")
    cancel_grace_seconds: float = Field(30.0, description="after this, a cancelling job's process is stopped")
    job_timeout: int = Field(24 * 3600, description="RQ timeout of one graft job, seconds")
    idempotency_ttl: int = Field(25 * 3600, description="seconds an Idempotency-Key is remembered")
    retry_after_seconds: int = Field(2, description="Retry-After sent with 202 responses")
    webhook_max_attempts: int = Field(6, description="deliveries tried per webhook before giving up")
    webhook_backoff: float = Field(1.0, description="first retry delay of a webhook, doubled each time")
    webhook_timeout: float = Field(5.0, description="seconds one webhook POST may take")
    webhook_allow_private: bool = Field(False, description="allow webhooks to loopback/private addresses")
    job_block_delay: float = Field(0.0, description="seconds slept after each streamed block (tests only)")
    worker_preload: bool = Field(True, description="import torch and the engine once in the worker parent "
                                 "(no CUDA is touched there) so each forked job starts fast")

    # API limits and tenancy (see README "Limits and guarantees").
    max_body_bytes: int = Field(256 << 10, description="largest request body the API reads (413 above)")
    max_metadata_bytes: int = Field(8 << 10, description="a job's metadata, keys and values together (422 above)")
    tenant_rate_per_minute: float = Field(120.0, description="job submissions and previews per tenant per minute "
                                          "(429 with Retry-After above); 0 disables")
    tenant_rate_burst: int = Field(30, description="submissions a tenant may make at once before the rate applies")
    tenant_max_unfinished_jobs: int = Field(100, description="queued or running jobs a tenant may have (429 above); "
                                            "0 disables")
    tenant_grants: str = Field("", description="per-tenant extra prefixes, read and write: "
                               "'tenant=uri|uri;tenant2=uri' (file:// or s3://)")
    preview_workers: int = Field(2, description="processes that build previews, off the API's event loop")
    preview_timeout: float = Field(20.0, description="seconds a preview may take before its process is killed (504)")
    unavailable_retry_after: int = Field(5, description="Retry-After sent with 503 while Redis is unreachable")

    # Engine input hardening (CLI).
    debug: bool = Field(False, description="the CLI prints a traceback with an internal_error (never otherwise)")

    # Webhook targets (worker/service/webhooks.py).
    webhook_resolve_timeout: float = Field(2.0, description="seconds a webhook host's DNS lookup may take; "
                                           "unanswered: accepted at submission (checked again at delivery), "
                                           "retried at delivery")

    # Redis outages in the worker (see worker/service/outage.py).
    redis_timeout: float = Field(5.0, description="seconds one Redis command of the worker's threads and job "
                                 "processes may take before Redis counts as unreachable")
    redis_retry_max: float = Field(5.0, description="longest wait between tries while Redis is unreachable (the "
                                   "waits start at 0.2 s and double)")
    redis_wait_seconds: float = Field(300.0, description="how long a job waits for Redis to record its outcome "
                                      "(succeeded, failed, cancelled); past it the attempt fails and RQ retries it")

    # Storage faults between job attempts (worker/service/jobs.py).
    retry_backoff: float = Field(5.0, description="seconds before a job that failed with storage_error is tried "
                                 "again; doubled for each further attempt (capped at 10 minutes)")

    # One graft over many workers (worker/service/fanout.py).
    shard_min_bytes: int = Field(10 * 10**9, description="a graft whose output has several shards and at least "
                                 "this many bytes runs as one task per output shard plus a finalize task")
    shard_queued_per_tenant: int = Field(2, description="shard tasks of one tenant waiting in the queue at once; "
                                         "the rest wait in the job's record and are queued round-robin across "
                                         "tenants as these start")


    @property
    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    @property
    def allowed_root_list(self) -> list[str]:
        return _split(self.allowed_roots)

    @property
    def allowed_bucket_list(self) -> list[str]:
        return _split(self.allowed_buckets)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
