"""Resolving a request's inputs and planning it from their headers: what a graft, a dry run, a preview,
an inspection and an evaluation all start with. No tensor data is read here."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.pipeline.publish import storage_retry
from worker.engine.planning.plan import Plan
from worker.engine.planning.recipe import ARTIFACT_SIDES, artifact_input, split_artifact_input
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.lanes import RemoteReads
from worker.engine.storage.model import GENERATION_CONFIG, TOKENIZER_FILES, ResolvedModel, resolve_model
from worker.engine.storage.stores import RemoteStore
from worker.engine.storage.uris import parse_uri

log = logging.getLogger("graft.engine")


def remote_reads(settings: EngineSettings) -> RemoteReads:
    return RemoteReads(lanes=settings.remote_lanes, window_bytes=settings.remote_window_bytes,
                       windows=settings.remote_windows, span_windows=settings.remote_span_windows,
                       stall_seconds=settings.remote_stall_seconds)


def tokenizer_donor(request: GraftRequest) -> str:
    """The role the output's tokenizer and generation config come from: the fine-tune (graft's convention), or
    the target for a recipe with mergekit's (mergekit copies its base_model's), or the input a recipe's
    `tokenizer` names; the fine-tune or the target is the fallback."""
    if request.recipe.tokenizer is not None:
        return next(role for role, uri in request.inputs().items() if uri == request.recipe.tokenizer.source)
    if request.recipe.conventions == "mergekit":
        return "target_base"
    return "source_finetuned"


def _side_files_of(uri: str, uris: dict[str, str], donor: str) -> tuple[str, ...]:
    """The small files a graft copies from this input: the donor's tokenizer and generation config, the
    other's generation config (used when the donor has none)."""
    names: tuple[str, ...] = ()
    if uri == uris[donor]:
        names += (*TOKENIZER_FILES, GENERATION_CONFIG)
    if uri in (uris["target_base"], uris["source_finetuned"]) and GENERATION_CONFIG not in names:
        names += (GENERATION_CONFIG,)
    return names


def resolve_inputs(request: GraftRequest, settings: EngineSettings | None = None, *,
                   side_files: bool = False) -> dict[str, ResolvedModel]:
    """`side_files`: also fetch the small files the output copies (a graft, not a dry run), all at once."""
    settings = settings or EngineSettings()
    uris = request.inputs()
    donor = tokenizer_donor(request)
    # One model per distinct URI: a recipe's diffs often share their base (and the target may be it).
    first_role: dict[str, str] = {}
    for role, uri in uris.items():
        first_role.setdefault(uri, role)
    artifacts = {a[0]: role for uri, role in first_role.items() if (a := split_artifact_input(uri)) is not None}
    models = {uri: role for uri, role in first_role.items() if split_artifact_input(uri) is None}
    with ThreadPoolExecutor(max_workers=min(8, len(models) + len(artifacts))) as pool:
        futures = {role: pool.submit(resolve_model, role, parse_uri(uri, field=role),
                                     endpoint_url=settings.s3_endpoint_url,
                                     max_header_bytes=settings.max_header_bytes,
                                     reads=remote_reads(settings),
                                     allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                                     require_model_type=uri == uris["target_base"],
                                     side_files=_side_files_of(uri, uris, donor) if side_files else (),
                                     retry=storage_retry(settings)) for uri, role in models.items()}
        opened = {uri: pool.submit(_open_artifact, uri, role, request, settings) for uri, role in artifacts.items()}
        resolved, errors = {}, []
        for role, future in futures.items():
            try:
                resolved[uris[role]] = future.result()
            except BaseException as exc:
                errors.append(exc)
        for uri, future in opened.items():
            try:
                artifact = future.result()
            except BaseException as exc:
                errors.append(exc)
                continue
            for side in ARTIFACT_SIDES:
                resolved[artifact_input(uri, side)] = artifact.model(side)
    if errors:
        close_models(resolved)
        raise errors[0]
    return {role: resolved[uri] for role, uri in uris.items()}


def _open_artifact(uri: str, role: str, request: GraftRequest, settings: EngineSettings):
    """A diff artifact of the recipe, checked (worker/engine/diffs/artifact.py), its field named as the recipe's
    diff (diffs.<i>.diff)."""
    from worker.engine.diffs.artifact import open_artifact
    from worker.engine.diffs.shard_cache import shard_cache_for
    from worker.engine.storage.input_hashes import DigestCache

    index = role.rpartition(".")[2] if "." in role else "0"
    return open_artifact(uri, parse_uri(uri, field=f"diffs.{index}.diff"), endpoint_url=settings.s3_endpoint_url,
                         max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                         allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                         retry=storage_retry(settings), digest_cache=DigestCache(settings.cache_dir or None),
                         shard_cache=shard_cache_for(settings.cache_dir, settings.artifact_cache_bytes))


def close_models(models: dict[str, ResolvedModel]) -> None:
    for store in {id(m.store): m.store for m in models.values()}.values():  # shared by several roles: once
        store.close()


def canonical_roles(models: dict[str, ResolvedModel]) -> dict[str, str]:
    """Role -> the first role naming the same model: reads of one model are issued (and coalesced) once."""
    first: dict[int, str] = {}
    return {role: first.setdefault(id(m), role) for role, m in models.items()}


def memory_bound(models: dict[str, ResolvedModel], settings: EngineSettings) -> dict:
    """What remote I/O holds at most: per remote input, its windows (lanes x window bytes, plus the window
    being read); for an S3 output, its parts in flight plus the one being filled."""
    canon = canonical_roles(models)
    remote = {role: m.store.reads.describe() for role, m in models.items()
              if canon[role] == role and isinstance(m.store, RemoteStore)}
    return {"remote_inputs": remote, "remote_input_bytes": sum(r["bytes"] for r in remote.values()),
            "s3_output_bytes": settings.s3_part_bytes * (max(1, settings.s3_parts_in_flight) + 1)}


def plan_graft(request: GraftRequest, settings: EngineSettings | None = None, *,
               side_files: bool = False) -> tuple[Plan, dict[str, ResolvedModel]]:
    """The --dry-run: everything decided from headers alone (`side_files`: see resolve_inputs)."""
    settings = settings or EngineSettings()
    models = resolve_inputs(request, settings, side_files=side_files)
    try:
        return plan_models(request, models, settings), models
    except BaseException:
        close_models(models)
        raise


def plan_models(request: GraftRequest, models: dict[str, ResolvedModel], settings: EngineSettings) -> Plan:
    """The plan of models already resolved (GraftError when the graft cannot be planned). Every request is a
    recipe and is planned as one; the compute step runs a tensor that is the plain transfer on the plain kernel."""
    from worker.engine.planning.recipe_plan import build_recipe_plan

    by_uri = {uri: models[role] for role, uri in request.inputs().items()}
    plan, plan.merge = build_recipe_plan(request.recipe, by_uri)
    plan.memory = memory_bound(models, settings)
    return plan


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise GraftError("invalid_option", "device cuda was asked for but no GPU is visible")
    return torch.device("cpu")
