"""Recipes on top of the three-input planner: one plan per diff composed into one output plan whose
transferred segments become `merge` segments reading the target and every contributing diff, and the
arithmetic of such a segment (float32 accumulation, float64 when an input is float64, one rounding).

The plain fine-tuning transfer (one diff, a plain sum, a scalar weight) never comes here: it keeps the
single-diff path and its bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel

from worker.engine.compute.arithmetic import _FINITE_LIMIT, CHUNK, TensorStats, _finite
from worker.engine.errors import GraftError
from worker.engine.methods import MERGES, TRANSFORMS
from worker.engine.methods.base import RankWindow
from worker.engine.methods.dare import draw_key
from worker.engine.planning.options import GraftOptions, base_role, finetuned_role
from worker.engine.planning.plan import OutputTensor, Plan, Segment, build_plan
from worker.engine.planning.recipe import Recipe, layer_position, rule_for, transform_at, weight_at
from worker.engine.storage.model import ResolvedModel


@dataclass
class DiffUse:
    """One diff's part in one output tensor."""

    index: int
    weight: float
    transform: BaseModel | None
    window: RankWindow | None = None
    key: int = 0
    kept: int = 0
    seen: int = 0

    def to_dict(self) -> dict:
        out = {"diff": self.index, "weight": self.weight,
               "transform": self.transform.model_dump(by_alias=True) if self.transform else None}
        if self.seen:
            kept = self.window.high - self.window.low if self.window is not None else self.kept
            out["kept_fraction"] = round(kept / self.seen, 6)
        return out


@dataclass
class MergeContext:
    """Everything the compute pass needs beyond the plan: per tensor, the diffs that make it."""

    method: object
    params: BaseModel
    uses: dict[str, list[DiffUse]]
    tallies: dict[str, dict] = field(default_factory=dict)
    scratch: Scratch = field(default_factory=lambda: Scratch())

    def windows(self) -> list[tuple[str, DiffUse]]:
        return [(name, u) for name, uses in self.uses.items() for u in uses if u.window is not None]

    def summary(self) -> dict:
        """What the plan says of the recipe: the merge, and how many tensors each diff contributes to."""
        counts: dict[int, int] = {}
        for uses in self.uses.values():
            for u in uses:
                counts[u.index] = counts.get(u.index, 0) + 1
        return {"merge": self.params.model_dump(by_alias=True), "merged_tensors": len(self.uses),
                "tensors_per_diff": [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)],
                "statistics_passes": 2 if self.windows() else 0}

    def tensor_report(self, name: str) -> dict | None:
        uses = self.uses.get(name)
        if uses is None:
            return None
        out = {"method": self.params.method, "diffs": [u.to_dict() for u in uses]}
        tally = self.tallies.get(name, {})
        if tally.get("voted"):
            out["sign_agreement"] = round(tally["unanimous"] / tally["voted"], 6)
        return out


def _layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return _layers(text) if isinstance(text, dict) else None


def build_recipe_plan(recipe: Recipe, models: dict[str, ResolvedModel]) -> tuple[Plan, MergeContext]:
    """`models` maps each URI of the recipe to its resolved model (one per distinct URI)."""
    options: GraftOptions = recipe.options.engine_options()
    target = models[recipe.target_base]
    _check_architectures(recipe, models)
    plans = [build_plan(target, models[d.source_base], models[d.source_finetuned], options) for d in recipe.diffs]
    plan = plans[0]
    by_name = [{t.name: t for t in p.tensors} for p in plans]
    method = MERGES[recipe.merge.method]
    default = method.default_transform(recipe.merge)
    layers = _layers(target.config)
    if recipe.layers is not None and layers != recipe.layers:
        raise GraftError("invalid_recipe", f"layers: the recipe is written for {recipe.layers} layers (its "
                         f"layer_range), the target has {layers}", {"field": "layers"})
    uses: dict[str, list[DiffUse]] = {}
    for tensor in plan.tensors:
        made = _compose(tensor, [b.get(tensor.name) for b in by_name], recipe, default, layers)
        if made:
            uses[tensor.name] = made
    for p in plans[1:]:  # what only the other diffs noticed (a tensor missing from their sources, say)
        seen = {(w.get("code"), w.get("tensor")) for w in plan.warnings}
        plan.warnings += [w for w in p.warnings if (w.get("code"), w.get("tensor")) not in seen]
        plan.source_only += [d for d in p.source_only if d not in plan.source_only]
    # Said in the plan (preview, dry run), as events and in the manifest: the recipe computes differently
    # from the config it was imported from.
    plan.warnings += [{"code": "foreign_semantics", "reason": n.code, "message": n.message} for n in recipe.notes]
    if recipe.tokenizer is not None:
        from worker.engine.planning.vocabulary import check_vocabularies

        check_vocabularies(recipe.tokenizer, models, plan.vocab.get("output_rows"))
    return plan, MergeContext(method, recipe.merge, uses)


def _check_architectures(recipe: Recipe, models: dict[str, ResolvedModel]) -> None:
    """Every input of a recipe is the target's architecture (its config's model_type, where one is given):
    a diff taken from another architecture would be added by name to whatever happens to share it."""
    expected = models[recipe.target_base].config.get("model_type")
    for i, diff in enumerate(recipe.diffs):
        for role in ("source_base", "source_finetuned"):
            found = models[getattr(diff, role)].config.get("model_type")
            if found is not None and found != expected:
                raise GraftError("architecture_mismatch", f"diffs.{i}.{role}: model_type {found!r}, the "
                                 f"target's is {expected!r}", {"field": f"diffs.{i}.{role}"})


def _compose(tensor: OutputTensor, per_diff: list[OutputTensor | None], recipe: Recipe, default: BaseModel | None,
             layers: int | None) -> list[DiffUse]:
    """Turn the first diff's plan of one tensor into the recipe's: its transferred segments read every
    diff that transfers the tensor. Returns the diffs used (none: the tensor is copied)."""
    contributing = [i for i, t in enumerate(per_diff) if t is not None and t.action != "copied"]
    if not contributing:
        return []
    shapes = {(per_diff[i].shape, tuple(per_diff[i].segments)) for i in contributing}
    if len(shapes) > 1:
        raise GraftError("vocab_mismatch", f"{tensor.name}: the diffs disagree on its rows (their fine-tunes or "
                         "bases have different vocabularies); use vocab: target, or exclude the tensor")
    rule = rule_for(recipe.rules, tensor.name)
    position = layer_position(tensor.name, layers, recipe.conventions)
    uses = []
    for i in contributing:
        diff = recipe.diffs[i]
        rule_weight, rule_transform = rule.setting(i) if rule is not None else (None, None)
        weight = weight_at(rule_weight if rule_weight is not None else diff.weight, position)
        transform = transform_at(rule_transform or diff.transform or default, position)
        uses.append(DiffUse(i, weight, transform))
    first = per_diff[contributing[0]]
    sources = {"target_base": tensor.sources["target_base"]}
    for i in contributing:
        sources[base_role(i)] = per_diff[i].sources["source_base"]
        sources[finetuned_role(i)] = per_diff[i].sources["source_finetuned"]
    tensor.sources = sources
    tensor.segments = [Segment("merge", s.start, s.stop) if s.op == "transfer" else
                       Segment(f"finetuned.{contributing[0]}" if s.op == "finetuned" else s.op, s.start, s.stop)
                       for s in first.segments]
    tensor.compute_dtype = "F64" if any(i.dtype == "F64" for i in sources.values()) else "F32"
    span = sum(s.stop - s.start for s in tensor.segments if s.op == "merge")
    for use in uses:
        if use.transform is not None:
            seed = getattr(use.transform, "seed", 0)
            use.key = draw_key(seed, f"{use.index}\x00{tensor.name}")
            use.window = TRANSFORMS[use.transform.method].window(use.transform, span)
    return uses


class Scratch:
    """Reused chunk buffers of one compute thread: fresh megabyte tensors per chunk cost page faults."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(max(n, CHUNK), dtype=dtype, device=device)
        return buf[:n]


def merge_chunks(out: torch.Tensor, target: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 uses: list[DiffUse], ctx: MergeContext, name: str, start: int, compute: torch.dtype,
                 stats: TensorStats, device: torch.device, whole: bool) -> None:
    """out = target + merge(transform(f_i - s_i), w_i) for one piece; `start` is the piece's first element
    within the tensor's merged span (what DARE's draw and the rank windows count). `whole`: the piece at once
    (an accelerator's way; the tests force it on the CPU), else cache-sized chunks."""
    n = out.numel()
    step = n if whole else CHUNK
    tally = ctx.tallies.setdefault(name, {})
    limit = _FINITE_LIMIT.get(out.dtype)
    scratch = ctx.scratch
    for i in range(0, n, step):
        j = min(n, i + step)
        m = j - i
        acc = scratch.get("acc", m, compute, device)
        acc.copy_(target[i:j])
        bases: dict[int, torch.Tensor] = {}  # diffs of one base share its conversion
        for k, ((s, f), use) in enumerate(zip(pairs, uses, strict=True)):
            base = bases.get(s.data_ptr())
            if base is None:
                base = bases[s.data_ptr()] = scratch.get(f"base{len(bases)}", m, compute, device)
                base.copy_(s[i:j])
            delta = scratch.get(f"delta{k}", m, compute, device)
            delta.copy_(f[i:j])
            delta.sub_(base)
            if k == 0:
                _connectivity(stats, acc, base, delta, scratch.get("tmp", m, compute, device))
            use.seen += m
            kept = None
            if use.transform is not None:
                kept = TRANSFORMS[use.transform.method].apply(delta, use.transform, window=use.window, key=use.key,
                                                              start=start + i,
                                                              spare=scratch.get("spare", m, compute, device))
            use.kept += m if kept is None else kept  # a window's count comes from its width (DiffUse.to_dict)
        ctx.method.combine(acc, [scratch.get(f"delta{k}", m, compute, device) for k in range(len(uses))],
                           [u.weight for u in uses], ctx.params, tally,
                           lambda name, m=m: scratch.get(name, m, compute, device))
        finite = _finite(acc)
        big = float(acc.abs().max()) if limit is not None and m else 0.0
        stats.nonfinite |= not finite or (limit is not None and big >= limit)
        out[i:j].copy_(acc.to(out.dtype).cpu() if acc.device != out.device else acc)


def _connectivity(stats: TensorStats, target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor,
                  bases: torch.Tensor) -> None:
    """The manifest's proxies, from the first diff: ||delta||, ||target||, ||target - base||, their dot."""
    torch.sub(target, base, out=bases)
    stats.delta_sq += float(torch.dot(delta, delta))
    stats.target_sq += float(torch.dot(target, target))
    stats.bases_sq += float(torch.dot(bases, bases))
    stats.cross += float(torch.dot(bases, delta))
