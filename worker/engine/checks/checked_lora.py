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

Memory: one adapter module while exporting (export_lora's bound), a chunk of rows of one target tensor (and one
small factor of its module) while merging, and the evaluation's own bound (at most about two models loaded,
limits.py). Candidates are removed as soon as they are scored."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.engine.checks.checked_graft import sweep_scratch
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
    scratch = sweep_scratch(settings, SCRATCH_PREFIX)
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
    lora_B.bias, modules_to_save and trainable token rows in place), from the adapter's files, in float32 and
    rounded once to the target's dtype; written as a local model directory (the target's config, one file per
    tensor). Row chunk by row chunk (CHUNK elements), each written as it is merged: memory is a chunk, never a
    whole tensor (an embedding or lm_head is GBs)."""
    from safetensors import safe_open

    from worker.engine.storage.local_files import LocalSink
    from worker.engine.storage.uris import Location

    target = _resolve(request, "target_base", request.spec.target_base, settings)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        config = json.load(fh)
    # The index goes last, as the manifest: until then the directory is a hidden sibling, never half a model.
    sink = LocalSink(Location("file", path=out), manifest_name=INDEX)
    weight_map, total = {}, 0
    try:
        with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as weights:
            lora = _Adapter(weights, config)
            for i, (name, info) in enumerate(sorted(target.tensors.items())):
                weight_map[name] = f"model-{i + 1:05d}.safetensors"
                total += info.nbytes
                _write_merged(sink, weight_map[name], _merged_chunks(target, info, lora), info)
        sink.put("config.json", json.dumps(target.config).encode())
        sink.commit(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}).encode())
    except BaseException:
        sink.abort()
        raise
    finally:
        target.store.close()


INDEX = "model.safetensors.index.json"
CHUNK = 1 << 20  # target elements merged at a time (a row at least)


class _Adapter:
    """The adapter's tensors as the merge reads them: by name, or rows [first, first + count) of one."""

    def __init__(self, weights, config: dict) -> None:
        self.weights, self.config, self.keys = weights, config, set(weights.keys())

    def whole(self, key: str):
        return self.weights.get_tensor(key)

    def rows(self, key: str, first: int, count: int):
        view = self.weights.get_slice(key)
        return view[first:first + count] if view.get_shape() else self.whole(key).reshape(1)  # a scalar: 1 row


def _write_merged(sink, file: str, chunks, info) -> None:
    """One tensor's safetensors file (the header safetensors' save_file writes), its bytes as they come."""
    from worker.engine.diffs.encodings.common import as_bytes
    from worker.engine.storage.safetensors_format import build_header

    header, _ = build_header([(info.name, info.dtype, tuple(info.shape))], {"format": "pt"})
    writer = sink.open(file, len(header) + info.nbytes)
    try:
        writer.write(header)
        for chunk in chunks:
            writer.write(as_bytes(chunk))
        if writer.size != len(header) + info.nbytes:
            raise GraftError("internal_error", f"{file}: {writer.size} bytes merged, the header says "
                             f"{len(header) + info.nbytes}")
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _merged_chunks(target, info, lora: _Adapter):
    """The merged tensor in row chunks of the target's dtype, each read, merged in float32 and rounded once."""
    import torch

    from worker.engine.storage.safetensors_format import DTYPES

    dtype, shape = DTYPES[info.dtype], tuple(info.shape)
    rows, width = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    if not rows * width:
        return
    step = max(1, CHUNK // width)
    saved = f"base_model.model.{info.name}"
    update = None if saved in lora.keys else _update(info.name, lora)
    buffer = memoryview(bytearray(min(step, rows) * width * dtype.itemsize))
    for first in range(0, rows, step):
        count = min(step, rows - first)
        if update is None:  # modules_to_save: the adapter's own values replace the target's
            yield lora.rows(saved, first, count).to(dtype)
            continue
        view = buffer[:count * width * dtype.itemsize]
        target.store.read_into(info.file, info.start + first * width * dtype.itemsize, view)
        value = torch.frombuffer(view, dtype=dtype).view(count, *shape[1:]).float()
        update(value, first, count)
        yield value.to(dtype)


def _update(name: str, lora: _Adapter):
    """What the adapter does to rows [first, first + count) of `name`, in place on their float32 values."""
    import torch

    module, kind = name.rsplit(".", 1) if "." in name else (name, "")
    key, config = f"base_model.model.{module}", lora.config
    if kind == "weight" and f"{key}.lora_A.weight" in lora.keys:
        scaling, a_key, b_key = config["lora_alpha"] / config["r"], f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        if config.get("fan_in_fan_out"):  # Conv1D stores [in, out]: its rows are B A's columns
            b, a = lora.whole(b_key).float(), lora.weights.get_slice(a_key)

            def conv1d(value, first: int, count: int) -> None:
                value += _product(b, a[:, first:first + count].float()).T * scaling
            return conv1d
        a = lora.whole(a_key).float()

        def linear(value, first: int, count: int) -> None:
            value += _product(lora.rows(b_key, first, count).float(), a) * scaling
        return linear
    if kind == "bias" and f"{key}.lora_B.bias" in lora.keys:
        def bias(value, first: int, count: int) -> None:
            value += lora.rows(f"{key}.lora_B.bias", first, count)
        return bias
    tokens = f"{key}.token_adapter.trainable_tokens_delta"
    if kind == "weight" and tokens in lora.keys:
        indices = (config.get("trainable_token_indices") or {}).get(module) or []

        def token_rows(value, first: int, count: int) -> None:
            from worker.engine.pipeline.lora_export import _runs

            picked = [k for k, row in enumerate(indices) if first <= row < first + count]
            for k, n in _runs(picked, len(picked) or 1):
                value[torch.tensor(indices[k:k + n], dtype=torch.long) - first] = lora.rows(tokens, k, n).float()
        return token_rows
    return lambda value, first, count: None


def _product(b, a):
    """B A in float32, summed over the rank term by term in one fixed order. A GEMM's float32 sums depend on the
    shapes it is given (its blocking, vector tails, threads): B A of a chunk of rows is not bit for bit those rows
    of B A, so the merged bytes would change with the chunk size. Term by term, each element's sum is the same
    whatever the chunk (and the thread count)."""
    product = b[:, :1] * a[:1]
    for k in range(1, a.shape[0]):
        product += b[:, k:k + 1] * a[k:k + 1]
    return product
