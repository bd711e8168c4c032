"""The HTTP API: records jobs in Redis and queues them; never touches tensor data.

The hot path (GET /v1/jobs/{id}) is async on redis.asyncio and returns the stored document without a
pydantic round trip. The rest is sync (FastAPI runs it in its thread pool) on the shared JobStore.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time

import orjson
import redis
import redis.asyncio as aioredis
from fastapi import Body, Depends, FastAPI, Header, Query
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from worker.engine.errors import GraftError
from worker.engine.options import GraftOptions
from worker.job_store import ACTIVE, STATUSES, TERMINAL, JobStore, decode_job, new_job_id, now_iso
from worker.settings import Settings, get_settings
from worker.uri_policy import PolicyError, check_uri, output_for
from worker.webhooks import check_webhook_url

from . import problems
from .auth import dev_key, parse_keys, tenant_of
from .metrics import JobCollector, RequestMetrics
from .problems import Problem, field_error
from .schemas import EventList, Health, Job, JobCreate, JobList, Plan
from .schemas import Problem as ProblemSchema

API_VERSION = "1.0.0"
PROBLEM = {"model": ProblemSchema, "content": {"application/problem+json": {}}}
ERRORS = {401: {**PROBLEM, "description": "missing or unknown API key"},
          404: {**PROBLEM, "description": "no such job for this tenant"}}
OPTION_FIELDS = ("shard_size", "include", "exclude", "alpha", "vocab", "dtype", "device")


def _json(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _options(body: JobCreate) -> dict:
    try:
        return GraftOptions(**body.options.model_dump()).to_dict()
    except GraftError as err:
        name = next((f for f in OPTION_FIELDS if err.message.startswith(f)), "")
        raise field_error(f"options.{name}" if name else "options", err.message) from err


def _check_inputs(body: JobCreate, settings: Settings) -> None:
    for role in ("source_base", "source_finetuned", "target_base"):
        try:
            check_uri(getattr(body, role), role, settings)
        except PolicyError as err:
            raise field_error(err.field, err.message.removeprefix(f"{err.field}: "), "uri_not_allowed") from err


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = parse_keys(settings.api_keys)
    if not keys:
        if not settings.dev_mode:
            raise RuntimeError("GRAFT_API_KEYS is empty: set comma-separated key:tenant pairs "
                               "(or GRAFT_DEV_MODE=1 for a generated key)")
        key = dev_key()
        keys = parse_keys(f"{key}:dev")
        print(f"GRAFT_DEV_API_KEY={key} (tenant dev; dev mode only)", flush=True)

    app = FastAPI(title="graft", version=API_VERSION,
                  description="Fine-tuning transfer as a service: target_base + alpha * (source_finetuned - "
                              "source_base), run by queue workers, streamed to object storage.")
    app.state.keys = keys
    app.state.settings = settings
    sync_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    store = JobStore(sync_redis, settings.key_prefix)
    aredis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5)
    registry = CollectorRegistry()
    registry.register(JobCollector(store, settings.queue_name))
    problems.install(app)
    app.add_middleware(RequestMetrics, registry=registry)

    def owned(job_id: str, tenant: str) -> dict:
        raw = sync_redis.hgetall(store.job_key(job_id))
        if not raw or raw.get(b"tenant", b"").decode() != tenant:
            raise Problem(404, "not_found", f"no job {job_id}")
        return decode_job(raw)

    # --- jobs -----------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=202, response_model=Job, tags=["jobs"],
              responses={**ERRORS, 400: PROBLEM, 422: {**PROBLEM, "description": "invalid field (named)"}},
              summary="Submit a graft job")
    def create_job(body: JobCreate, tenant: str = Depends(tenant_of),
                   idempotency_key: str | None = Header(None, max_length=255)) -> Response:
        options = _options(body)
        _check_inputs(body, settings)
        if body.webhook_url:
            try:
                check_webhook_url(body.webhook_url, allow_private=settings.webhook_allow_private)
            except ValueError as err:
                raise field_error("webhook_url", str(err)) from err
        job_id = new_job_id()
        try:
            output = output_for(job_id, body.output, settings)
        except PolicyError as err:
            raise field_error("output", err.message.removeprefix("output: "), "uri_not_allowed") from err
        idem_rkey = None
        if idempotency_key is not None:
            replay, idem_rkey = _claim_idempotency(tenant, idempotency_key, body, job_id)
            if replay is not None:
                return _json(replay, 202, {"Location": f"/v1/jobs/{replay['id']}", "Idempotent-Replayed": "true",
                                           "Retry-After": str(settings.retry_after_seconds)})
        doc = {"id": job_id, "object": "graft.job", "status": "queued", "created_at": now_iso(),
               "started_at": None, "finished_at": None, "source_base": body.source_base,
               "source_finetuned": body.source_finetuned, "target_base": body.target_base, "output": output,
               "options": options, "metadata": body.metadata, "webhook_url": body.webhook_url, "attempt": 0,
               "max_attempts": settings.max_attempts, "progress": None, "result": None, "error": None}
        try:
            store.create(doc, tenant)
        except Exception:
            if idem_rkey is not None:  # free the key: a retry must not wait 25 h on a job that never existed
                sync_redis.delete(idem_rkey)
            raise
        try:
            from worker.jobs import enqueue

            enqueue(sync_redis, job_id, settings)
        except Exception as exc:
            error = {"code": "enqueue_failed", "message": str(exc)}
            store.transition(job_id, ("queued",), "failed", finished_at=now_iso(), error=error)
            raise Problem(503, "enqueue_failed", f"the job could not be queued: {exc}") from exc
        return _json(doc, 202, {"Location": f"/v1/jobs/{job_id}", "Retry-After": str(settings.retry_after_seconds)})

    def _claim_idempotency(tenant: str, key: str, body: JobCreate, job_id: str) -> tuple[dict | None, str]:
        """(None, key) when this request owns the key; otherwise the job an earlier identical request made."""
        body_hash = hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()
        rkey = store.idem_key(tenant, hashlib.sha256(key.encode()).hexdigest())
        if sync_redis.set(rkey, orjson.dumps({"body": body_hash, "job": job_id}), nx=True,
                          ex=settings.idempotency_ttl):
            return None, rkey
        held = orjson.loads(sync_redis.get(rkey) or b"{}")
        if held.get("body") != body_hash:
            raise Problem(422, "idempotency_key_reused",
                          "this Idempotency-Key was used with a different body",
                          errors=[{"field": "Idempotency-Key", "message": "reused with a different body",
                                   "type": "idempotency_key_reused"}])
        deadline = time.monotonic() + 2.0  # the first request may still be writing its record
        while time.monotonic() < deadline:
            doc = store.get(held["job"])
            if doc is not None:
                return doc, rkey
            time.sleep(0.02)
        raise Problem(409, "idempotency_in_progress", "the first request with this key is still being processed")

    @app.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=ERRORS, summary="Get a job")
    async def get_job(job_id: str, tenant: str = Depends(tenant_of)) -> Response:
        raw = await aredis.hgetall(store.job_key(job_id))
        if not raw or raw.get(b"tenant", b"").decode() != tenant:
            raise Problem(404, "not_found", f"no job {job_id}")
        return _json(decode_job(raw))

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"], responses={**ERRORS, 422: PROBLEM},
             summary="List the caller's jobs, newest first")
    def list_jobs(tenant: str = Depends(tenant_of), limit: int = Query(20, ge=1, le=100),
                  after: str | None = Query(None, max_length=64, description="last_id of the previous page"),
                  status: str | None = Query(None, description="only jobs with this status")) -> Response:
        if status is not None and status not in STATUSES:
            raise field_error("status", f"must be one of {', '.join(STATUSES)}")
        data: list[dict] = []
        cursor = after
        while len(data) <= limit:
            ids = store.list_ids(tenant, cursor, max(limit + 1, 50) if status else limit + 1)
            if not ids:
                break
            cursor = ids[-1]
            for doc in store.get_many(ids):
                if doc is not None and (status is None or doc["status"] == status):
                    data.append(doc)
        has_more = len(data) > limit
        data = data[:limit]
        return _json({"object": "list", "data": data, "has_more": has_more,
                      "last_id": data[-1]["id"] if data else None})

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"],
              responses={**ERRORS, 409: {**PROBLEM, "description": "the job already ended"}},
              summary="Cancel a queued or running job")
    def cancel_job(job_id: str, tenant: str = Depends(tenant_of)) -> Response:
        doc = owned(job_id, tenant)
        for _ in range(5):  # the status can move under us; each step below is a compare-and-set
            status = doc["status"]
            if status in TERMINAL:
                raise Problem(409, "job_ended", f"job {job_id} already ended ({status})")
            if status == "cancelling":
                break
            if status == "queued":
                if store.transition(job_id, ("queued",), "cancelled", finished_at=now_iso(),
                                    event={"type": "finished", "status": "cancelled"}):
                    _drop_from_queue(job_id)
                    break
            elif store.transition(job_id, ACTIVE[:-1], "cancelling", event={"type": "cancel_requested"}):
                store.request_cancel(job_id)
                break
            doc = owned(job_id, tenant)
        return _json(owned(job_id, tenant))

    def _drop_from_queue(job_id: str) -> None:
        from rq.job import Job as RQJob

        try:
            RQJob.fetch(job_id, connection=sync_redis).cancel()
        except Exception:
            pass  # already taken by a worker: run_job sees the cancelled record and does nothing

    @app.get("/v1/jobs/{job_id}/events", response_model=EventList, tags=["jobs"], responses=ERRORS,
             summary="Timestamped events of a job")
    def job_events(job_id: str, tenant: str = Depends(tenant_of)) -> Response:
        owned(job_id, tenant)
        return _json({"object": "list", "data": store.events(job_id)})

    @app.post("/v1/jobs:preview", response_model=Plan, tags=["jobs"],
              responses={**ERRORS, 400: PROBLEM, 422: PROBLEM},
              summary="The dry-run plan, from safetensors headers alone")
    async def preview(body: JobCreate = Body(...), tenant: str = Depends(tenant_of)) -> Response:
        options = _options(body)
        _check_inputs(body, settings)

        def plan() -> dict:
            from worker.engine.options import GraftRequest
            from worker.engine.run import plan_graft  # imports torch on first use; headers only

            request = GraftRequest(body.source_base, body.source_finetuned, body.target_base, "",
                                   GraftOptions(**options))
            return plan_graft(request, settings)[0].to_dict()

        try:
            summary = await run_in_threadpool(plan)
        except GraftError as err:
            raise Problem(422, err.code, err.message) from err
        return _json({"object": "graft.plan", **summary})

    # --- operations -----------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="The process is up")
    async def healthz() -> Response:
        return _json({"status": "ok", "checks": {}})

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: PROBLEM},
             summary="Redis and storage are reachable")
    async def readyz() -> Response:
        checks = {}
        try:
            await asyncio.wait_for(aredis.ping(), 2)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        checks["storage"] = await run_in_threadpool(_storage_check, settings)
        ok = all(v == "ok" or v.startswith("not configured") for v in checks.values())
        if not ok:
            return _json({"type": "/problems/not_ready", "title": "Service Unavailable", "status": 503,
                          "detail": "; ".join(f"{k}: {v}" for k, v in checks.items()), "code": "not_ready",
                          "checks": checks}, 503)
        return _json({"status": "ok", "checks": checks})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _storage_check(settings: Settings) -> str:
    """The default output location answers (a bucket HEAD, or a writable directory)."""
    if not settings.output_uri:
        return "not configured"
    try:
        from worker.engine.uris import parse_uri

        loc = parse_uri(settings.output_uri)
        if loc.scheme == "s3":
            from worker.engine.s3 import s3_client

            s3_client(settings.s3_endpoint_url).head_bucket(Bucket=loc.bucket)
            return "ok"
        os.makedirs(loc.path, exist_ok=True)
        return "ok" if os.access(loc.path, os.W_OK) else "error: not writable"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def app_from_env() -> FastAPI:
    """uvicorn factory entry point (`uvicorn --factory app.main:app_from_env`)."""
    try:
        return create_app()
    except (RuntimeError, ValueError) as err:
        print(f"graft serve: {err}", file=sys.stderr)
        raise SystemExit(2) from err
