"""The HTTP API: records jobs in Redis and queues them; never touches tensor data.

create_app wires the parts: the Gate (API key, then body size, before a body is read), the routers, the
problem+json handlers, and the shared state (Redis clients, job store, tenant limits, the preview pool).
"""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from worker.service.job_store import JobStore
from worker.service.settings import Settings, get_settings
from worker.service.uri_policy import parse_grants

from . import problems, routes_collections, routes_jobs, routes_ops
from .auth import Gate, dev_key, parse_keys
from .limits import TenantLimits
from .metrics import JobCollector, RequestMetrics
from .preview import PreviewPool
from .state import AppState

API_VERSION = "1.1.0"
log = logging.getLogger("graft.api")


def _keys(settings: Settings) -> dict[str, str]:
    keys = parse_keys(settings.api_keys)
    if keys:
        return keys
    if not settings.dev_mode:
        raise RuntimeError("GRAFT_API_KEYS is empty: set comma-separated key:tenant pairs "
                           "(or GRAFT_DEV_MODE=1 for a generated key)")
    key = dev_key()
    print(f"GRAFT_DEV_API_KEY={key} (tenant dev; dev mode only)", flush=True)
    return parse_keys(f"{key}:dev")


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operationId: its name in camelCase (get_job -> getJob, a kind's create_job ->
    createJob), so clients generated from openapi.yaml read naturally. FastAPI's default
    (get_job_v1_jobs__job_id__get) spells out the path and the method, and changes with either."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = _keys(settings)
    parse_grants(settings.tenant_grants)  # refuse a bad grant spec at start, not on the first request
    sync_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    store = JobStore(sync_redis, settings.key_prefix)
    registry = CollectorRegistry()
    registry.register(JobCollector(store, settings.queue_name))
    state = AppState(settings, keys, sync_redis,
                     aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2),
                     store, registry, TenantLimits(sync_redis, store, settings),
                     PreviewPool(settings.model_dump(), settings.preview_workers, settings.preview_timeout))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            # Jobs recorded before the per-status index existed; one HGET once done. Redis may be away at
            # start: the API then still starts (and answers 503) and a later start backfills.
            await run_in_threadpool(store.backfill_status_index)
        except redis.RedisError as exc:
            log.warning("status index backfill skipped: %s", exc)
        try:
            yield
        finally:
            state.close()
            await state.aredis.aclose()

    app = FastAPI(title="graft", version=API_VERSION, lifespan=lifespan, generate_unique_id_function=operation_id,
                  description="Fine-tuning transfer as a service: target_base + alpha * (source_finetuned - "
                              "source_base), run by queue workers, streamed to object storage.")
    app.state.graft = state
    app.state.keys = keys
    app.state.settings = settings
    problems.install(app)
    app.include_router(routes_jobs.kind_routes())  # one POST per job kind, from the table
    app.include_router(routes_jobs.router)
    app.include_router(routes_collections.diffs_router)
    app.include_router(routes_collections.loras_router)
    app.include_router(routes_ops.router)
    app.add_middleware(Gate, keys=keys, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, registry=registry)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory entry point (`uvicorn --factory app.main:app_from_env`)."""
    try:
        return create_app()
    except (RuntimeError, ValueError) as err:
        print(f"graft serve: {err}", file=sys.stderr)
        raise SystemExit(2) from err
