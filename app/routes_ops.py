"""Operations: liveness, readiness (Redis and the default output storage) and Prometheus metrics."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from worker.service.settings import Settings

from .routes_jobs import PROBLEM
from .schemas import Health
from .state import AppState, app_state

router = APIRouter(tags=["ops"])


def _json(doc, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@router.get("/healthz", response_model=Health, summary="The process is up")
async def get_liveness() -> Response:
    return _json({"status": "ok", "checks": {}})


@router.get("/readyz", response_model=Health, responses={503: PROBLEM}, summary="Redis and storage are reachable")
async def get_readiness(state: AppState = Depends(app_state)) -> Response:
    checks = {}
    try:
        await asyncio.wait_for(state.aredis.ping(), 2)
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    checks["storage"] = await run_in_threadpool(_storage_check, state.settings)
    ok = all(v == "ok" or v.startswith("not configured") for v in checks.values())
    if not ok:
        return _json({"type": "/problems/not_ready", "title": "Service Unavailable", "status": 503,
                      "detail": "; ".join(f"{k}: {v}" for k, v in checks.items()), "code": "not_ready",
                      "checks": checks}, 503)
    return _json({"status": "ok", "checks": checks})


@router.get("/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}})
def get_metrics(state: AppState = Depends(app_state)) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


def _storage_check(settings: Settings) -> str:
    """The default output location answers, as its scheme probes it (a bucket HEAD, a writable directory)."""
    if not settings.output_uri:
        return "not configured"
    try:
        from worker.engine.storage import schemes
        from worker.engine.storage.uris import parse_uri

        loc = parse_uri(settings.output_uri)
        return schemes.get(loc.scheme).ready(loc, settings.s3_endpoint_url)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:200]}"
