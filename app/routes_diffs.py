"""/v1/diffs: the tenant's diffs (the artifacts its diff_extract jobs published; POST /v1/diffs, the kind's route,
submits one), read, listed and deleted. The records are worker/service/diffs.py's; deleting removes the artifact's
files from storage here, in the API's thread pool (a few requests per artifact: its manifest, shards and side
files), never on the event loop."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from worker.engine.errors import GraftError
from worker.engine.storage import schemes
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.schemes.base import Access
from worker.service import diffs
from worker.service.uri_policy import PolicyError, check_uri, scope_for

from .auth import tenant_of
from .problems import Problem
from .routes_jobs import ERRORS, PROBLEM, _json, rate_limited
from .schemas import DiffArtifact, DiffList
from .state import AppState, app_state

DIFF_ERRORS = {**ERRORS, 404: {**PROBLEM, "description": "no such diff for this tenant"}}
router = APIRouter(prefix="/v1", tags=["diffs"])


@router.get("/diffs", response_model=DiffList, responses={**ERRORS, 422: PROBLEM},
            summary="List the caller's diffs (its extractions that succeeded, not deleted), newest first")
def list_diffs(tenant: str = Depends(tenant_of), state: AppState = Depends(app_state),
               limit: int = Query(20, ge=1, le=100),
               after: str | None = Query(None, max_length=64, description="last_id of the previous page")) -> Response:
    ids = diffs.list_ids(state.store, tenant, after, limit + 1)
    with state.redis.pipeline(transaction=False) as pipe:
        for diff_id in ids:
            pipe.hgetall(state.store.job_key(diff_id))
        raws = pipe.execute()
    # A diff can be deleted between the index and its record: the page shows what the records say now.
    data = [diffs.view(raw) for raw in raws if raw and not raw.get(b"deleted_at")]
    has_more = len(data) > limit
    data = data[:limit]
    return _json({"object": "list", "data": data, "has_more": has_more, "last_id": data[-1]["id"] if data else None})


@router.get("/diffs/{diff_id}", response_model=DiffArtifact, responses=DIFF_ERRORS,
            summary="Get a diff: provenance, encoding, sizes, reconstruction errors, status")
def get_diff(diff_id: str, tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> Response:
    raw = diffs.owned_raw(state.store, diff_id, tenant)
    if raw is None:
        raise Problem(404, "not_found", f"no diff {diff_id}")
    return _json(diffs.view(raw))


@router.delete("/diffs/{diff_id}", response_model=DiffArtifact, summary="Delete a diff and its artifact's files",
               description="Marks the diff deleted first (jobs naming it, queued or submitted later, fail or are "
                           "refused `diff_deleted`), then removes its files, the manifest first. A storage failure "
                           "leaves it `deleting` (503): the same DELETE again finishes the removal.",
               responses={**DIFF_ERRORS, 409: {**PROBLEM, "description": "the extraction has not succeeded (nothing "
                                                                     "to delete yet, or ever)"},
                          429: {**PROBLEM, "description": "the tenant's rate is exhausted (see Retry-After)"}})
def delete_diff(diff_id: str, tenant: str = Depends(rate_limited), state: AppState = Depends(app_state)) -> Response:
    try:
        raw = diffs.mark_deleted(state.store, diff_id, tenant)
    except diffs.DiffRefused as err:
        raise Problem(404 if err.code == "not_found" else 409, err.code, err.message) from err
    if not raw.get(diffs.REMOVED.encode()):
        _remove_files(raw, state, tenant)
        raw = diffs.mark_removed(state.store, diff_id)
    return _json(diffs.view(raw))


def _remove_files(raw: dict, state: AppState, tenant: str) -> None:
    """The artifact's files, removed through its scheme (manifest first), confined as the tenant's outputs are."""
    settings = state.settings
    view = diffs.view(raw)
    try:  # the output's policy again: a symlink placed since, or a grant withdrawn, keeps the files where they are
        location = check_uri(view["uri"], "diff", settings, output=True, tenant=tenant)
    except PolicyError as err:
        raise Problem(409, "diff_files_kept", f"the diff is deleted, but its files were kept: {err.message}") from err
    allowed, denied = scope_for(tenant, settings).engine_roots()
    access = Access(endpoint_url=settings.s3_endpoint_url, allowed_roots=allowed, denied_roots=denied,
                    retry=StorageRetry(budget=settings.storage_retry_seconds, timeout=settings.storage_timeout_seconds))
    try:
        schemes.get(location.scheme).remove(location, diffs.artifact_files(raw), access)
    except GraftError as err:
        if err.code == "uri_not_allowed":  # the directory resolves elsewhere now: nothing was removed
            raise Problem(409, "diff_files_kept", f"the diff is deleted, but its files were kept: {err.message}") \
                from err
        raise Problem(503, err.code, f"the diff is deleted; removing its files failed (DELETE it again): "
                      f"{err.message}", headers={"Retry-After": str(settings.unavailable_retry_after)}) from err
