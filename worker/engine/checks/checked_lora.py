"""A LoRA export with its fidelity measured: the evaluation of `graft run --evaluate` run on target + adapter,
against the full graft and against the fine-tune, per rank; with several ranks, a sweep that publishes the
smallest rank within max_kl of the full graft.

    full graft  -> run_graft into private scratch (the reference the adapter approximates)
    per rank    -> export_lora into scratch -> target + adapter merged as PEFT merges it, read back from the
                   adapter's own files (what is scored is what is published) -> evaluate(merged vs fine-tune),
                   evaluate(merged vs full graft): probe loss, KL(fine-tune || merged), KL(full || merged)
    pick        -> the smallest rank with KL(full || merged) <= max_kl (none: the largest, with a warning)
    publish     -> export_lora at the pick into the real output; its adapter's sha256 must be the scored one's
                   (the factorization is seeded: same request, same bytes) -> manifest["fidelity"]

Memory: one adapter module while exporting (export_lora's bound), one tensor of the target while merging, and
the evaluation's own bound (at most about two models loaded, limits.py). Candidates are removed as soon as they
are scored."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.phases import Phase
from worker.engine.pipeline.lora_request import LoraExportRequest, vllm_rank

if TYPE_CHECKING:
    from worker.engine.pipeline.lora_export import LoraResult
    from worker.engine.storage.model import ResolvedModel

SCRATCH_PREFIX = "graft-lora-sweep-"


def run_checked_lora(request: LoraExportRequest, settings: EngineSettings | None = None, *,
                     evaluate: EvaluateSpec | None = None, progress: Callable[[dict], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> LoraResult:
    """export_lora with what the spec asks beyond the adapter: `evaluate` (one rank) or `ranks` (a sweep).
    `evaluate` gives the probe text and prompts (default: the built-in ones). `progress` gets export_lora's
    {modules_done, modules_total} for the published adapter; before it, a sweep reports phase `evaluating` with
    the full graft and the candidates as its steps (modules_done of modules_total)."""
    from worker.engine.pipeline.lora_export import export_lora

    spec, settings = request.spec, settings or EngineSettings()
    if spec.ranks is None and not spec.evaluate:
        return export_lora(request, settings, progress=progress, should_cancel=should_cancel)
    ranks = spec.ranks or [spec.rank] if spec.energy is None else None
    if ranks is None:
        raise GraftError("invalid_option", "evaluate: give rank or ranks (an energy adapter's rank is not known "
                         "before it is built)")
    if spec.profile == "vllm":
        ranks = sorted({vllm_rank(r) for r in ranks})  # what the adapters will have: no rank scored twice
    scratch = _scratch(settings)
    try:
        def scored(done: int) -> None:  # a sweep takes minutes before the published export starts: say so
            if progress is not None:
                progress({"phase": Phase.EVALUATING, "modules_done": done, "modules_total": len(ranks) + 1})

        scored(0)
        full = _full_graft(request, settings, scratch, should_cancel)
        curve = []
        for rank in ranks:
            scored(len(curve) + 1)
            curve.append(_candidate(request, rank, full, scratch, evaluate or EvaluateSpec(), settings,
                                    should_cancel))
        pick, warnings = _pick(curve, spec.max_kl)
        fidelity = {"max_kl": spec.max_kl, "picked_rank": pick["rank"], "curve": curve,
                    "kl": "mean over the prompts of KL(reference || target + adapter), nats per token",
                    "reference": {"full_graft": "target + alpha * (source_finetuned - source_base), graft run"}}

        def before_commit(manifest: dict) -> dict:
            digest = {f["path"]: f["sha256"] for f in manifest["files"]}.get("adapter_model.safetensors")
            if digest != pick["sha256"]:
                raise GraftError("internal_error", "the adapter differs from the one that was scored")
            return {"fidelity": fidelity, **({"warnings": warnings} if warnings else {})}

        final = LoraExportRequest(spec.model_copy(update={"rank": pick["rank"], "ranks": None}), request.writer,
                                  request.allowed_roots, request.denied_roots)
        return export_lora(final, settings, progress=progress, should_cancel=should_cancel,
                           before_commit=before_commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pick(curve: list[dict], max_kl: float) -> tuple[dict, list[dict]]:
    within = [c for c in curve if c["kl_to_full_graft"] is not None and c["kl_to_full_graft"] <= max_kl]
    if within:
        return min(within, key=lambda c: c["rank"]), []
    largest = max(curve, key=lambda c: c["rank"])
    return largest, [{"code": "no_rank_within_max_kl", "message": f"no rank of {[c['rank'] for c in curve]} "
                      f"keeps the KL to the full graft within {max_kl}; the largest was published"}]


def _scratch(settings: EngineSettings) -> str:
    from worker.engine.storage.sinks import OWNER, remove_orphans

    parent = settings.scratch_dir or tempfile.gettempdir()
    remove_orphans(parent, SCRATCH_PREFIX)
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    with open(os.path.join(scratch, OWNER), "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    return scratch


def _roots(request: LoraExportRequest, scratch: str) -> list[str] | None:
    return None if request.allowed_roots is None else [*request.allowed_roots, scratch]


def _full_graft(request: LoraExportRequest, settings: EngineSettings, scratch: str,
                should_cancel: Callable[[], bool] | None) -> str:
    """The full graft the adapter stands for, built by the graft itself into the scratch directory."""
    from worker.engine.pipeline.graft import run_graft
    from worker.engine.planning.options import GraftOptions
    from worker.engine.planning.request import GraftRequest

    spec, out = request.spec, os.path.join(scratch, "full-graft")
    graft = GraftRequest.single(spec.source_base, spec.source_finetuned, spec.target_base, out,
                                GraftOptions(alpha=spec.alpha), allowed_roots=_roots(request, scratch),
                                denied_roots=request.denied_roots)
    run_graft(graft, settings=settings, should_cancel=should_cancel)
    return out


def _candidate(request: LoraExportRequest, rank: int, full: str, scratch: str, evaluate: EvaluateSpec,
               settings: EngineSettings, should_cancel: Callable[[], bool] | None) -> dict:
    """One rank: its adapter, scored through target + adapter, then removed."""
    from worker.engine.pipeline.lora_export import export_lora

    directory = os.path.join(scratch, f"rank-{rank}")
    spec = request.spec.model_copy(update={"rank": rank, "ranks": None, "output": directory})
    result = export_lora(LoraExportRequest(spec, None, _roots(request, scratch), request.denied_roots), settings,
                         should_cancel=should_cancel)
    merged = os.path.join(scratch, f"merged-{rank}")
    try:
        merge_adapter(request, directory, merged, settings)
        scores = _scores(request, merged, full, evaluate, settings, should_cancel)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    files = {f["path"]: f for f in result.manifest["files"]}
    shutil.rmtree(directory, ignore_errors=True)
    return {"rank": result.manifest["rank"], "adapter_bytes": files["adapter_model.safetensors"]["size"],
            "sha256": files["adapter_model.safetensors"]["sha256"],
            "rel_frobenius": result.manifest["totals"]["rel_frobenius_lora"],
            "left_out_share": result.manifest["totals"]["left_out_share"], **scores}


def _scores(request: LoraExportRequest, merged: str, full: str, evaluate: EvaluateSpec, settings: EngineSettings,
            should_cancel: Callable[[], bool] | None) -> dict:
    from worker.engine.checks.evaluation import isolation
    from worker.engine.pipeline.resolve import pick_device

    spec = request.spec
    models = {role: _resolve(request, role, uri, settings) for role, uri in (
        ("output", merged), ("target_base", spec.target_base), ("source_finetuned", spec.source_finetuned),
        ("full_graft", full))}
    device = str(pick_device(spec.device))
    roots = (None if request.allowed_roots is None else [*request.allowed_roots, os.path.dirname(merged)],
             request.denied_roots)
    try:
        to_finetuned = isolation.evaluate(models["output"], models["target_base"], models["source_finetuned"],
                                          evaluate, settings=settings, device=device, should_cancel=should_cancel,
                                          roots=roots)
        to_full = isolation.evaluate(models["output"], models["target_base"], models["full_graft"], evaluate,
                                     settings=settings, device=device, should_cancel=should_cancel, roots=roots)
    finally:
        for model in models.values():
            model.store.close()
    probe = to_finetuned["probe"]
    return {"probe_loss": probe["output"]["loss"], "probe_loss_full_graft": to_full["probe"]["source_finetuned"]
            ["loss"], "probe_loss_finetuned": probe["source_finetuned"]["loss"],
            "kl_to_full_graft": to_full["kl_to_finetuned"]["mean"],
            "kl_to_finetuned": to_finetuned["kl_to_finetuned"]["mean"]}


def _resolve(request: LoraExportRequest, role: str, uri: str, settings: EngineSettings) -> ResolvedModel:
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import remote_reads
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    allowed = request.allowed_roots if role in ("target_base", "source_finetuned") else None
    return resolve_model(role, parse_uri(uri, field=role), endpoint_url=settings.s3_endpoint_url,
                         max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                         allowed_roots=allowed, denied_roots=request.denied_roots, retry=storage_retry(settings))


def merge_adapter(request: LoraExportRequest, adapter: str, out: str, settings: EngineSettings) -> None:
    """target + adapter as PEFT's merge_and_unload computes it (W + B A, Conv1D W + (B A)^T, biases plus
    lora_B.bias, modules_to_save and trainable token rows in place), from the adapter's files, tensor by tensor
    in float32 and rounded once to the target's dtype; written as a local model directory (the target's config)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = _resolve(request, "target_base", request.spec.target_base, settings)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        config = json.load(fh)
    os.makedirs(out)
    weight_map, total = {}, 0
    try:
        with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as weights:
            keys = set(weights.keys())
            for i, (name, info) in enumerate(sorted(target.tensors.items())):
                value = _merged(target, name, info, weights, keys, config)
                weight_map[name] = f"model-{i + 1:05d}.safetensors"
                total += value.numel() * value.element_size()
                save_file({name: value}, os.path.join(out, weight_map[name]), metadata={"format": "pt"})
    finally:
        target.store.close()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(target.config, fh)


def _merged(target, name: str, info, weights, keys: set[str], config: dict):
    import torch

    from worker.engine.storage.safetensors_format import DTYPES

    dtype = DTYPES[info.dtype]
    buffer = bytearray(math.prod(info.shape) * dtype.itemsize)
    if buffer:
        target.store.read_into(info.file, info.start, memoryview(buffer))
    value = torch.frombuffer(buffer, dtype=dtype).view(info.shape).float() if buffer else torch.empty(info.shape)
    module, kind = name.rsplit(".", 1) if "." in name else (name, "")
    key = f"base_model.model.{module}"
    if f"base_model.model.{name}" in keys:  # modules_to_save
        return weights.get_tensor(f"base_model.model.{name}").to(dtype)
    if kind == "weight" and f"{key}.lora_A.weight" in keys:
        product = weights.get_tensor(f"{key}.lora_B.weight") @ weights.get_tensor(f"{key}.lora_A.weight")
        value += (product.T if config.get("fan_in_fan_out") else product) * (config["lora_alpha"] / config["r"])
    elif kind == "bias" and f"{key}.lora_B.bias" in keys:
        value += weights.get_tensor(f"{key}.lora_B.bias")
    elif kind == "weight" and f"{key}.token_adapter.trainable_tokens_delta" in keys:
        rows = (config.get("trainable_token_indices") or {}).get(module) or []
        value[torch.tensor(rows, dtype=torch.long)] = weights.get_tensor(
            f"{key}.token_adapter.trainable_tokens_delta").float()
    return value.to(dtype).contiguous()
