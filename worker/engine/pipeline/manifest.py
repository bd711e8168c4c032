"""What a result says about itself: `graft-manifest.json` and the model card."""

from __future__ import annotations

import json
import math

import torch

from worker.engine.compute.arithmetic import TensorStats
from worker.engine.planning.plan import Plan
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.sinks import FileRecord

ENGINE_VERSION = "0.2.0"
RECIPE_FORMULA = "target_base + merge_i(weight_i * transform_i(source_finetuned_i - source_base_i))"


def build_manifest(request: GraftRequest, models: dict[str, ResolvedModel], input_files: dict[str, dict],
                   plan: Plan, files: list[FileRecord], stats: dict[str, TensorStats], warnings: list[dict],
                   run_stats: dict, output_uri: str) -> dict:
    tensors = {}
    for t in plan.tensors:
        entry = {"action": t.action, "dtype": t.dtype, "shape": list(t.shape)}
        if t.note:
            entry["note"] = t.note
        if t.rows:
            entry["rows"] = t.rows
        if t.action in ("transferred", "vocab_extended", "untied_transfer"):
            entry.update(stats[t.name].to_dict())
        merged = plan.merge.tensor_report(t.name) if plan.merge is not None else None
        if merged is not None:
            entry["merge"] = merged
        tensors[t.name] = entry
    return {
        "format": "graft-manifest/1",
        "engine": {"name": "graft", "version": ENGINE_VERSION, "torch": torch.__version__},
        "formula": "target_base + alpha * (source_finetuned - source_base)" if request.plain else RECIPE_FORMULA,
        "recipe": request.recipe.to_dict(),
        "inputs": {role: {"uri": models[role].uri, "revision": models[role].store.revision,
                          "files": input_files[role]} for role in models},
        "options": request.options.to_dict(),
        "output": {"uri": output_uri, "files": [f.to_dict() for f in files]},
        "plan": {"actions": plan.counts(), "vocab": plan.vocab, "tied_word_embeddings": plan.tied_output,
                 "shards": [s.file for s in plan.shards]},
        "tensors": tensors,
        "source_only": plan.source_only,
        "warnings": warnings,
        "stats": run_stats,
        **_artifacts(models),
    }


def _artifacts(models: dict[str, ResolvedModel]) -> dict:
    """The diff artifacts the graft read, each with what identifies it and the pair it was extracted from."""
    seen: dict[str, dict] = {}
    for model in models.values():
        artifact = model.artifact
        if artifact is None or artifact.uri in seen:
            continue
        m = artifact.manifest
        seen[artifact.uri] = {"uri": artifact.uri, "content_address": m.content_address, "encoding": m.encoding,
                              "sources": {side: {"uri": s.uri, "revision": s.revision}
                                          for side, s in m.sources.items()}}
    return {"diff_artifacts": list(seen.values())} if seen else {}


def model_card(request: GraftRequest, plan: Plan) -> str:
    counts = ", ".join(f"{n} {a}" for a, n in sorted(plan.counts().items()))
    return f"""---
tags:
- graft
- fine-tuning-transfer
---
# Grafted checkpoint

This checkpoint is `target_base + alpha * (source_finetuned - source_base)`, built tensor by tensor
(fine-tuning transfer, Lin et al. 2025).

| role | model |
|---|---|
| target base | `{request.target_base}` |
{_sources(request)}

- {_strength(request)}; vocabulary policy: {request.options.vocab}; dtype: {request.options.dtype}
- tensors: {counts}; tied embeddings: {plan.tied_output}
- config from the target base; {_donor(request)}.
- `graft-manifest.json` lists every tensor, how it was made, and the sha256 of every file.
"""


def _sources(request: GraftRequest) -> str:
    first = request.recipe.diffs[0]
    if first.diff is not None:
        return f"| diff artifact | `{first.diff}` |"
    return f"| source base | `{first.source_base}` |\n| source fine-tune | `{first.source_finetuned}` |"


def _donor(request: GraftRequest) -> str:
    if request.recipe.conventions == "mergekit":
        return "tokenizer, chat template and generation config from the target base (mergekit's conventions)"
    return "tokenizer and chat template from the source fine-tune"


def _strength(request: GraftRequest) -> str:
    recipe = request.recipe
    if request.plain:
        return f"alpha: {request.options.alpha}"
    return (f"recipe: {len(recipe.diffs)} diff(s) merged by `{recipe.merge.method}`, {len(recipe.rules)} rule(s) "
            "(the manifest holds the whole recipe and what was applied to each tensor)")


def json_safe(value):
    """A record as strict JSON takes it (the manifest, a job, a report): a NaN or infinite number (a perplexity
    past exp(709), a probe's loss that overflowed) becomes None rather than failing the whole record."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()
