"""/v1: one submitting POST per job kind (from the table, worker/service/kinds), and /v1/jobs: read, list, cancel,
events and preview. No tensor work here: previews run in their own processes (app/preview.py), jobs in the
workers."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import orjson
from fastapi import APIRouter, Body, Depends, Header, Query
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from worker.engine.errors import GraftError
from worker.engine.planning.options import GraftOptions
from worker.engine.planning.recipe import ARTIFACT_SIDES, Diff, Recipe, RecipeOptions, artifact_input
from worker.service import diffs
from worker.service.job_store import CHECKS_SPEC, decode_job, new_job_id, now_iso
from worker.service.kinds import KINDS, Kind, graft
from worker.service.kinds.bodies import BodyError, Models, Submission
from worker.service.statuses import ACTIVE, TERMINAL, JobStatus
from worker.service.uri_policy import PolicyError, check_output_placement, check_uri, output_for, scope_for
from worker.service.webhooks import check_webhook_target

from .auth import tenant_of
from .problems import Problem, field_error
from .schemas import EventList, Job, JobCreate, JobList, Plan
from .schemas import Problem as ProblemSchema
from .state import AppState, app_state

PROBLEM = {"model": ProblemSchema, "content": {"application/problem+json": {}}}
ERRORS = {401: {**PROBLEM, "description": "missing or unknown API key"},
          404: {**PROBLEM, "description": "no such job for this tenant"},
          503: {**PROBLEM, "description": "the job store is unreachable (Retry-After says when to try again)"}}
LIMITED = {413: {**PROBLEM, "description": "the body is larger than GRAFT_MAX_BODY_BYTES"},
           422: {**PROBLEM, "description": "invalid field (named)"},
           429: {**PROBLEM, "description": "the tenant's rate or job quota is exhausted (see Retry-After)"}}
OPTION_FIELDS = ("shard_size", "include", "exclude", "alpha", "vocab", "dtype", "device")

router = APIRouter(prefix="/v1", tags=["jobs"])


def _json(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def rate_limited(tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> str:
    """Dependency of the routes that cost work: one unit of the tenant's rate (a sync dependency: FastAPI runs
    it on its thread pool, off the event loop)."""
    state.limits.take(tenant)
    return tenant


def _strength(body: Models) -> float:
    """The body's alpha as one number: a list (a sweep) builds at 1 and scales each candidate in the worker."""
    return body.options.alpha if isinstance(body.options.alpha, float | int) else 1.0


def _check_body(kind: Kind, body: Submission) -> None:
    """The kind's own checks of its body, then (for a recipe's body) the engine's checks of the options (RE2
    patterns, sizes), with the failing field named."""
    try:
        kind.check(body)
    except BodyError as err:
        raise field_error(err.field, err.message, err.code) from err
    if not isinstance(body, Models):
        return
    if isinstance(body.options.alpha, list):
        from worker.engine.checks.checked_graft import check_alphas

        try:
            check_alphas(body.options.alpha)
        except GraftError as err:
            raise field_error("options.alpha", err.message, err.code) from err
    try:
        GraftOptions(**{**body.options.model_dump(exclude={"parallelism"}), "alpha": _strength(body)})
    except GraftError as err:
        name = next((f for f in OPTION_FIELDS if err.message.startswith(f)), "")
        raise field_error(f"options.{name}" if name else "options", err.message, err.code) from err


def _recipe(body: Models) -> Recipe:
    """The recipe the body describes, in one of four ways: today's three fields (with alpha), a diff artifact
    (`diff`: its id or URI) or `diffs` in place of source_base/source_finetuned, or a mergekit config in place of
    all the models. `merge` and `rules` go with the first three; `options` with all (over a mergekit config's
    own). Alpha is one strength on the whole recipe, whichever way it came: its merged delta times alpha
    (Recipe.scaled). A diff's id stays as given here: _resolve_diffs puts its artifact's URI in its place."""
    options = RecipeOptions.model_validate(body.options.model_dump(exclude={"alpha"}))
    if body.mergekit_stage is not None and body.mergekit_config is None:
        raise field_error("mergekit_stage", "names a stage of a mergekit_config: give the config too")
    if body.mergekit_config is not None:
        recipe = _mergekit_recipe(body, options)
    else:
        if body.target_base is None:
            raise field_error("target_base", "required (or give a mergekit_config)", "missing")
        if body.diffs is not None:
            for role in ("source_base", "source_finetuned", "diff"):
                if getattr(body, role) is not None:
                    raise field_error(role, "give either diffs or source_base and source_finetuned (or diff), "
                                      "not both")
            diffs = body.diffs
        elif body.diff is not None:
            for role in ("source_base", "source_finetuned"):
                if getattr(body, role) is not None:
                    raise field_error(role, "a diff artifact (diff) replaces source_base and source_finetuned: "
                                      "give one or the other")
            diffs = [Diff(diff=body.diff)]
        else:
            for role in ("source_base", "source_finetuned"):
                if getattr(body, role) is None:
                    raise field_error(role, "required (or give diff, or diffs)", "missing")
            diffs = [Diff(source_base=body.source_base, source_finetuned=body.source_finetuned)]
        recipe = Recipe(target_base=body.target_base, diffs=diffs, rules=body.rules or [], options=options,
                        **({"merge": body.merge} if body.merge is not None else {}))
        try:
            recipe.check_strength()
        except GraftError as err:
            raise field_error(err.details["field"], err.message.split(": ", 1)[-1], err.code) from err
    sweep = isinstance(body.options.alpha, list)
    try:  # a sweep's every candidate too: none may leave float32's range in the worker
        scaled = [recipe.scaled(alpha) for alpha in (body.options.alpha if sweep else [body.options.alpha])]
    except GraftError as err:
        raise field_error("options.alpha", err.message, err.code) from err
    return recipe if sweep else scaled[0]  # a sweep's record holds the recipe at 1: the worker scales each


def _mergekit_recipe(body: Models, options: RecipeOptions) -> Recipe:
    """A mergekit config's recipe, the body's options over its own."""
    for name in ("target_base", "source_base", "source_finetuned", "diff", "diffs", "merge", "rules"):
        if getattr(body, name) is not None:
            raise field_error(name, "a mergekit_config names the models and the method itself")
    from worker.engine.planning.mergekit_config import recipe_from_mergekit

    try:  # resolve_local=False: nothing on the server's disk is probed for a tenant's config
        recipe = recipe_from_mergekit(body.mergekit_config, resolve_local=False, stage=body.mergekit_stage)
    except GraftError as err:
        raise field_error("mergekit_config", err.message, err.code) from err
    given = body.options.model_fields_set - {"alpha"}
    merged = {**recipe.options.model_dump(), **options.model_dump(include=given)}
    return recipe.model_copy(update={"options": RecipeOptions.model_validate(merged)})


def _diff_field(body: Models, index: int) -> str:
    """Where the body named a recipe's diff `index`: its own `diff`, or the recipe's diffs.<i>.diff."""
    return "diff" if body.diffs is None else f"diffs.{index}.diff"


def _resolve_diffs(body: Models, recipe: Recipe, state: AppState, tenant: str) -> Recipe:
    """The recipe with each diff artifact named by its id in its artifact's URI's place (the tenant's own diffs,
    extracted and not deleted), every artifact URI checked against the deleted diffs (`diff_deleted`): the
    record stores the URIs the worker reads. Reads Redis: off the event loop."""
    resolved = []
    for i, diff in enumerate(recipe.diffs):
        if diff.diff is None:
            resolved.append(diff)
            continue
        try:
            uri = diffs.resolve(state.store, diff.diff, tenant, _diff_field(body, i))
        except diffs.DiffRefused as err:
            raise field_error(err.field, err.message, err.code) from err
        # The artifact's input keys follow its URI (recipe.artifact_input), as Diff's own validator sets them.
        resolved.append(diff.model_copy(update={"diff": uri, **{side: artifact_input(uri, side)
                                                                 for side in ARTIFACT_SIDES}}))
    return recipe.model_copy(update={"diffs": resolved})


def _inputs(body: Models, recipe: Recipe) -> dict[str, str]:
    """Field name -> URI of every model and diff artifact the body names (a mergekit config's under its own
    name), each under the field that named it."""
    if body.mergekit_config is not None:
        return {f"mergekit_config ({uri})": uri for uri in
                {recipe.target_base, *(u for d in recipe.diffs for u in (d.source_base, d.source_finetuned))}}
    named = {"target_base": recipe.target_base}
    for i, diff in enumerate(recipe.diffs):
        if diff.diff is not None:
            named[_diff_field(body, i)] = diff.diff
        elif body.diffs is None:
            named.update(source_base=diff.source_base, source_finetuned=diff.source_finetuned)
        else:
            named[f"diffs.{i}.source_base"] = diff.source_base
            named[f"diffs.{i}.source_finetuned"] = diff.source_finetuned
    return named


def _graft_fields(recipe: Recipe) -> dict:
    """What the job record (and a preview process) holds of the request: the recipe, which the worker runs. The
    first diff's (its pair, or its artifact as `diff`) and the target's URIs and the engine options (alpha: a
    one-diff recipe's strength, else 1) are shown beside it, for the reader of a job; nothing reads them back."""
    first = recipe.diffs[0]
    pair = (None, None) if first.diff is not None else (first.source_base, first.source_finetuned)
    return {"source_base": pair[0], "source_finetuned": pair[1], "diff": first.diff,
            "target_base": recipe.target_base, "options": recipe.engine_options().to_dict(),
            "recipe": recipe.to_dict()}


def _described(kind: Kind, body: Submission, state: AppState, tenant: str) -> tuple[dict, dict[str, str]]:
    """(the record's fields naming what the job reads, field -> URI of each input as the body named it): a
    recipe's for a Models body (its diffs' ids resolved), the kind's own otherwise (its `diff`'s id resolved)."""
    if not kind.takes_recipe:
        fields = kind.fields(body)
        if fields.get("diff") is not None:  # a diff artifact the kind reads (a LoRA export's): its id resolved too
            try:
                fields = {**fields, "diff": diffs.resolve(state.store, fields["diff"], tenant, "diff")}
            except diffs.DiffRefused as err:
                raise field_error(err.field, err.message, err.code) from err
        return fields, kind.inputs(fields)
    recipe = _resolve_diffs(body, _recipe(body), state, tenant)
    return _graft_fields(recipe), _inputs(body, recipe)


def _check_request(body: Submission, inputs: dict[str, str], state: AppState, tenant: str) -> None:
    """Everything about a body that needs no job id: sizes, inputs, webhook (resolves the host: a thread)."""
    settings = state.settings
    if len(orjson.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise field_error("metadata", f"larger than {settings.max_metadata_bytes} bytes", "too_large")
    for name, uri in inputs.items():
        try:
            check_uri(uri, name, settings, tenant=tenant)
        except PolicyError as err:
            raise field_error(err.field, err.message.removeprefix(f"{err.field}: "), "uri_not_allowed") from err
    if body.webhook_url:
        try:
            check_webhook_target(body.webhook_url, allow_private=settings.webhook_allow_private,
                                 timeout=settings.webhook_resolve_timeout)
        except ValueError as err:
            kind = getattr(err, "code", "invalid")
            raise field_error("webhook_url", str(err), kind if kind != "invalid" else "webhook_url_invalid") from err


def _output(job_id: str, body: Submission, state: AppState, tenant: str) -> str:
    try:
        output = output_for(job_id, body.output, state.settings, tenant)
        # The default too: GRAFT_OUTPUT_URI, or the tenant's own namespace, may lie in a model or a result.
        check_output_placement(check_uri(output, "output", state.settings, output=True, tenant=tenant),
                               "output", state.settings, tenant=tenant)
        return output
    except PolicyError as err:
        raise field_error("output", err.message.removeprefix("output: "), "uri_not_allowed") from err
    except GraftError as err:
        raise Problem(503, err.code, err.message, headers={"Retry-After": "5"}) from err


def kind_routes() -> APIRouter:
    """One POST per kind of the table, each the same handler with the kind's body: what create_app includes,
    so a kind registered before the app is built has its route, and its OpenAPI entry with it."""
    kinds = APIRouter(prefix="/v1", tags=["jobs"])
    for kind in KINDS.values():
        responses = {**ERRORS, 400: PROBLEM, **LIMITED,
                     **{code: {**PROBLEM, "description": text} for code, text in kind.route.responses.items()}}
        kinds.add_api_route(kind.route.path, _submitting(kind), methods=["POST"], name=kind.route.name,
                            status_code=202, response_model=Job, summary=kind.route.summary,
                            description=kind.route.description or "", responses=responses)
    return kinds


def _submitting(kind: Kind) -> Callable[..., Response]:
    """The route's handler: FastAPI reads the body's model from its signature, so each kind has its own."""
    def handler(body, tenant: str = Depends(rate_limited), state: AppState = Depends(app_state),
                idempotency_key: str | None = Header(None, max_length=255)) -> Response:
        return create(kind, body, tenant, state, idempotency_key)

    handler.__annotations__ = {**handler.__annotations__, "body": kind.body}
    handler.__name__ = handler.__qualname__ = kind.route.name
    return handler


def create(kind: Kind, body: Submission, tenant: str, state: AppState, idempotency_key: str | None) -> Response:
    """Submit a job of `kind`: the same steps for every kind, the kind's own parts from the table."""
    # First: an identical request's replay is the original job, even where what has happened since (its output
    # published, a model placed above it, a limit lowered, a diff deleted) would refuse the request now.
    if idempotency_key is not None and (replay := _replay(state, tenant, idempotency_key, body)) is not None:
        return _replayed(replay, state)
    _check_body(kind, body)
    fields, inputs = _described(kind, body, state, tenant)
    _check_request(body, inputs, state, tenant)
    job_id = new_job_id()
    output = _output(job_id, body, state, tenant)
    spec = kind.spec(body)
    doc = _job_doc(kind, job_id, spec, fields, output, body, state)
    return _submit(doc, spec, body, state, tenant, idempotency_key)


def _job_doc(kind: Kind, job_id: str, spec: dict | None, fields: dict, output: str, body: Submission,
             state: AppState) -> dict:
    """A new job's record, whatever its kind: queued, its inputs and its checks (as the kind shows them)."""
    return {"id": job_id, "object": "graft.job", "kind": kind.name, "checks": kind.shown(spec),
            "status": JobStatus.QUEUED.value, "created_at": now_iso(), "started_at": None, "finished_at": None,
            **fields, "output": output, "metadata": body.metadata, "webhook_url": body.webhook_url,
            "attempt": 0, "max_attempts": state.settings.max_attempts, "progress": None, "result": None,
            "error": None}


def _submit(doc: dict, spec: dict | None, body: Submission, state: AppState, tenant: str,
            idempotency_key: str | None) -> Response:
    """Create the record (under the tenant's quota and an idempotency key) and queue it."""
    settings, store = state.settings, state.store
    job_id = doc["id"]
    idem_rkey = None
    if idempotency_key is not None:
        replay, idem_rkey = _claim_idempotency(state, tenant, idempotency_key, body, job_id)
        if replay is not None:  # an identical request came in while this one was being checked
            return _replayed(replay, state)
    if spec:
        doc = {**doc, CHECKS_SPEC: spec}  # stored beside the public fields, never shown
    try:
        cap = settings.tenant_max_unfinished_jobs
        if not store.create(doc, tenant, max_unfinished=cap if cap > 0 else None):  # counted and created at once
            raise state.limits.too_many_jobs(tenant)
    except BaseException:
        if idem_rkey is not None:  # free the key: a retry must not wait 25 h on a job that never existed
            state.redis.delete(idem_rkey)
        raise
    try:
        from worker.service.jobs import enqueue

        enqueue(state.redis, job_id, settings)
    except Exception as exc:
        error = {"code": "enqueue_failed", "message": str(exc)}
        store.transition(job_id, ("queued",), "failed", finished_at=now_iso(), error=error)
        raise Problem(503, "enqueue_failed", f"the job could not be queued: {exc}",
                      headers={"Retry-After": str(settings.unavailable_retry_after)}) from exc
    doc.pop(CHECKS_SPEC, None)
    return _json(doc, 202, {"Location": f"/v1/jobs/{job_id}", "Retry-After": str(settings.retry_after_seconds)})


def _claim_idempotency(state: AppState, tenant: str, key: str, body: Submission,
                       job_id: str) -> tuple[dict | None, str]:
    """(None, key) when this request owns the key; otherwise the job an earlier identical request made."""
    rkey, body_hash = _idempotency_slot(state, tenant, key, body)
    for _ in range(2):  # the holder's key may expire between our claim and our look at it: claim again
        if state.redis.set(rkey, orjson.dumps({"body": body_hash, "job": job_id}), nx=True,
                           ex=state.settings.idempotency_ttl):
            return None, rkey
        if (replay := _replay(state, tenant, key, body)) is not None:
            return replay, rkey
    raise Problem(409, "idempotency_in_progress", "the first request with this key is still being processed")


def _idempotency_slot(state: AppState, tenant: str, key: str, body: Submission
                      ) -> tuple[str, str]:
    """(the Redis key holding this Idempotency-Key, the hash of the body it was first used with)."""
    body_hash = hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()
    return state.store.idem_key(tenant, hashlib.sha256(key.encode()).hexdigest()), body_hash


def _replay(state: AppState, tenant: str, key: str, body: Submission) -> dict | None:
    """The job an earlier identical request with this key made (None: the key is unused); a different body
    is refused. Only looks: the key is claimed by _submit, once the request has passed every check."""
    rkey, body_hash = _idempotency_slot(state, tenant, key, body)
    raw = state.redis.get(rkey)
    if raw is None:
        return None
    held = orjson.loads(raw)
    if held.get("body") != body_hash:
        raise Problem(422, "idempotency_key_reused", "this Idempotency-Key was used with a different body",
                      errors=[{"field": "Idempotency-Key", "message": "reused with a different body",
                               "type": "idempotency_key_reused"}])
    deadline = time.monotonic() + 2.0  # the first request may still be writing its record
    while time.monotonic() < deadline:
        doc = state.store.get(held["job"])
        if doc is not None:
            return doc
        time.sleep(0.02)
    raise Problem(409, "idempotency_in_progress", "the first request with this key is still being processed")


def _replayed(doc: dict, state: AppState) -> Response:
    return _json(doc, 202, {"Location": f"/v1/jobs/{doc['id']}", "Idempotent-Replayed": "true",
                            "Retry-After": str(state.settings.retry_after_seconds)})


def _owned(state: AppState, job_id: str, tenant: str) -> dict:
    raw = state.redis.hgetall(state.store.job_key(job_id))
    if not raw or raw.get(b"tenant", b"").decode() != tenant:
        raise Problem(404, "not_found", f"no job {job_id}")
    return decode_job(raw)


@router.get("/jobs/{job_id}", response_model=Job, responses=ERRORS, summary="Get a job")
async def get_job(job_id: str, tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> Response:
    # The hot path: async Redis, the stored document as is.
    raw = await state.aredis.hgetall(state.store.job_key(job_id))
    if not raw or raw.get(b"tenant", b"").decode() != tenant:
        raise Problem(404, "not_found", f"no job {job_id}")
    return _json(decode_job(raw))


@router.get("/jobs", response_model=JobList, responses={**ERRORS, 422: PROBLEM},
            summary="List the caller's jobs, newest first")
def list_jobs(tenant: str = Depends(tenant_of), state: AppState = Depends(app_state),
              limit: int = Query(20, ge=1, le=100),
              after: str | None = Query(None, max_length=64, description="last_id of the previous page"),
              status: JobStatus | None = Query(None, description="only jobs with this status")) -> Response:
    ids = state.store.list_ids(tenant, after, limit + 1, status=status.value if status else None)
    # A job can move on between the index and its record: the page shows what the records say now.
    data = [doc for doc in state.store.get_many(ids) if doc is not None and (status is None or doc["status"] == status)]
    has_more = len(data) > limit
    data = data[:limit]
    return _json({"object": "list", "data": data, "has_more": has_more,
                  "last_id": data[-1]["id"] if data else None})


@router.post("/jobs/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job",
             responses={**ERRORS, 409: {**PROBLEM, "description": "the job already ended"}})
def cancel_job(job_id: str, tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> Response:
    store = state.store
    doc = _owned(state, job_id, tenant)
    for _ in range(5):  # the status can move under us; each step below is a compare-and-set
        status = doc["status"]
        if status in TERMINAL:
            raise Problem(409, "job_ended", f"job {job_id} already ended ({status})")
        if status == "cancelling":
            break
        if status == "queued":
            if store.transition(job_id, ("queued",), "cancelled", finished_at=now_iso(),
                                event={"type": "finished", "status": "cancelled"}):
                _drop_from_queue(state, job_id)
                break
        elif store.transition(job_id, ACTIVE[:-1], "cancelling", event={"type": "cancel_requested"}):
            store.request_cancel(job_id)
            break
        doc = _owned(state, job_id, tenant)
    return _json(_owned(state, job_id, tenant))


def _drop_from_queue(state: AppState, job_id: str) -> None:
    from rq.job import Job as RQJob

    try:
        RQJob.fetch(job_id, connection=state.redis).cancel()
    except Exception:
        pass  # already taken by a worker: run_job sees the cancelled record and does nothing


@router.get("/jobs/{job_id}/events", response_model=EventList, responses=ERRORS,
            summary="Timestamped events of a job")
def get_job_events(job_id: str, tenant: str = Depends(tenant_of), state: AppState = Depends(app_state)) -> Response:
    _owned(state, job_id, tenant)
    return _json({"object": "list", "data": state.store.events(job_id)})


@router.post("/jobs:preview", response_model=Plan, summary="The dry-run plan, from safetensors headers alone",
             responses={**ERRORS, 400: PROBLEM, **LIMITED,
                        504: {**PROBLEM, "description": "the preview overran GRAFT_PREVIEW_TIMEOUT"}})
async def preview_job(body: JobCreate = Body(...), tenant: str = Depends(rate_limited),
                      state: AppState = Depends(app_state)) -> Response:
    _check_body(KINDS[graft.NAME], body)  # the dry run of a graft job
    recipe = await run_in_threadpool(_resolve_diffs, body, _recipe(body), state, tenant)
    await run_in_threadpool(_check_request, body.model_copy(update={"webhook_url": None}), _inputs(body, recipe),
                            state, tenant)
    await run_in_threadpool(_output, new_job_id(), body, state, tenant)  # refused where the job's would be
    allowed, denied = scope_for(tenant, state.settings).engine_roots()
    request = {**_graft_fields(recipe), "confinement": {"allowed_roots": allowed, "denied_roots": denied}}
    return _json({"object": "graft.plan", **await state.previews.plan(request)})
