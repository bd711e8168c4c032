"""The kinds' collections (worker/service/collections.py): /v1/diffs and /v1/loras, the records of the tenant's
succeeded diff extractions and LoRA exports (the kinds' own POST routes submit them), read, listed and deleted by
one set of handlers. Deleting removes the output's files from storage here, in the API's thread pool (a few
requests per output: its manifest, then the files it lists), never on the event loop."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from starlette.responses import Response

from worker.engine.errors import GraftError
from worker.engine.storage import schemes
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.schemes.base import Access
from worker.service.collections import REMOVED, Collection, Refused
from worker.service.diffs import DIFFS
from worker.service.loras import LORAS
from worker.service.uri_policy import PolicyError, check_uri, scope_for

from .auth import tenant_of
from .problems import Problem
from .routes_jobs import ERRORS, PROBLEM, _json, rate_limited
from .schemas import DiffArtifact, DiffList, LoraAdapter, LoraList
from .state import AppState, app_state


def _path_named(handler: Callable[..., Response], name: str) -> Callable[..., Response]:
    """`handler` with its first parameter (the record's id) called `name`: FastAPI reads the path parameter by the
    signature's name, and each collection's is its own (`diff_id`, `lora_id`)."""
    signature = inspect.signature(handler)
    first, *rest = signature.parameters.values()

    def named(**kwargs) -> Response:
        return handler(kwargs.pop(name), **kwargs)

    named.__signature__ = signature.replace(parameters=[first.replace(name=name), *rest])  # type: ignore[attr-defined]
    return named


def collection_router(c: Collection, item: type[BaseModel], page: type[BaseModel], *, lists: str, gets: str,
                      deletes: str) -> APIRouter:
    """GET /v1/<name>, GET and DELETE /v1/<name>/{<noun>_id} for one collection; the summaries say what the
    collection's records are (`lists`: of what, `gets`: what a record shows, `deletes`: what deleting does
    beyond removing its files, the manifest first). The handlers are named list_<name>, get_<noun> and
    delete_<noun> (operationIds listDiffs, getDiff, ...)."""
    router = APIRouter(prefix="/v1", tags=[c.name])
    missing = {**ERRORS, 404: {**PROBLEM, "description": f"no such {c.noun} for this tenant"}}

    def listing(tenant: str = Depends(tenant_of), state: AppState = Depends(app_state),
                limit: int = Query(20, ge=1, le=100),
                after: str | None = Query(None, max_length=64, description="last_id of the previous page")) -> Response:
        ids = c.list_ids(state.store, tenant, after, limit + 1)
        with state.redis.pipeline(transaction=False) as pipe:
            for record_id in ids:
                pipe.hgetall(state.store.job_key(record_id))
            raws = pipe.execute()
        # A record can be deleted between the index and its hash: the page shows what the hashes say now.
        data = [c.view(raw) for raw in raws if raw and not raw.get(b"deleted_at")]
        has_more = len(data) > limit
        data = data[:limit]
        return _json({"object": "list", "data": data, "has_more": has_more,
                      "last_id": data[-1]["id"] if data else None})

    def getting(record_id: str, tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> Response:
        raw = c.owned_raw(state.store, record_id, tenant)
        if raw is None:
            raise Problem(404, "not_found", f"no {c.noun} {record_id}")
        return _json(c.view(raw))

    def deleting(record_id: str, tenant: str = Depends(rate_limited), state: AppState = Depends(app_state)) -> Response:
        try:
            raw = c.mark_deleted(state.store, record_id, tenant)
        except Refused as err:
            raise Problem(404 if err.code == "not_found" else 409, err.code, err.message) from err
        if not raw.get(REMOVED.encode()):
            _remove_files(c, raw, state, tenant)
            raw = c.mark_removed(state.store, record_id)
        return _json(c.view(raw))

    item_path = f"/{c.name}/{{{c.noun}_id}}"
    router.add_api_route(f"/{c.name}", listing, methods=["GET"], name=f"list_{c.name}", response_model=page,
                         responses={**ERRORS, 422: PROBLEM}, summary=f"List the caller's {c.name} ({lists}, not "
                         "deleted), newest first")
    router.add_api_route(item_path, _path_named(getting, f"{c.noun}_id"), methods=["GET"], name=f"get_{c.noun}",
                         response_model=item, responses=missing, summary=f"Get a {c.noun}: {gets}")
    unfinished = f"the {c.action} has not succeeded (nothing to delete yet, or ever)"
    router.add_api_route(
        item_path, _path_named(deleting, f"{c.noun}_id"), methods=["DELETE"], name=f"delete_{c.noun}",
        response_model=item, summary=f"Delete a {c.noun} and its files",
        description=f"Marks the {c.noun} deleted first{deletes}, then removes its files, the manifest first. A "
                    "storage failure leaves it `deleting` (503): the same DELETE again finishes the removal.",
        responses={**missing, 409: {**PROBLEM, "description": unfinished},
                   429: {**PROBLEM, "description": "the tenant's rate is exhausted (see Retry-After)"}})
    return router


def _remove_files(c: Collection, raw: dict, state: AppState, tenant: str) -> None:
    """The output's files, removed through its scheme (manifest first), confined as the tenant's outputs are."""
    settings = state.settings
    kept = f"{c.noun}_files_kept"
    try:  # the output's policy again: a symlink placed since, or a grant withdrawn, keeps the files where they are
        location = check_uri(c.view(raw)["uri"], c.noun, settings, output=True, tenant=tenant)
    except PolicyError as err:
        raise Problem(409, kept, f"the {c.noun} is deleted, but its files were kept: {err.message}") from err
    allowed, denied = scope_for(tenant, settings).engine_roots()
    access = Access(endpoint_url=settings.s3_endpoint_url, allowed_roots=allowed, denied_roots=denied,
                    retry=StorageRetry(budget=settings.storage_retry_seconds, timeout=settings.storage_timeout_seconds))
    try:
        schemes.get(location.scheme).remove(location, c.files(raw), access)
    except GraftError as err:
        if err.code == "uri_not_allowed":  # the directory resolves elsewhere now: nothing was removed
            raise Problem(409, kept, f"the {c.noun} is deleted, but its files were kept: {err.message}") from err
        raise Problem(503, err.code, f"the {c.noun} is deleted; removing its files failed (DELETE it again): "
                      f"{err.message}", headers={"Retry-After": str(settings.unavailable_retry_after)}) from err


diffs_router = collection_router(
    DIFFS, DiffArtifact, DiffList, lists="its extractions that succeeded",
    gets="provenance, encoding, sizes, reconstruction errors, status",
    deletes=" (jobs naming it, queued or submitted later, fail or are refused `diff_deleted`)")
loras_router = collection_router(
    LORAS, LoraAdapter, LoraList, lists="the adapters its exports published",
    gets="inputs, rank, profile, sizes, per-module summary, what was left out, status", deletes="")
