"""Recipes on top of the three-input planner: one plan per diff composed into one output plan whose
transferred segments become `merge` segments reading the target and every contributing diff, each merged
tensor recorded with the diffs that make it and the whole-tensor statistics its methods need (made here,
gathered by worker/engine/compute/statistics_pass.py, applied by compute/merge_kernel.py).

A merged tensor with one diff, a plain sum (no normalize) and no transform is the plain fine-tuning transfer
at alpha = weight * lambda: the compute step runs it on the plain kernel, with today's bytes
(`MergeContext.plain_alpha`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel

from worker.engine.errors import GraftError
from worker.engine.methods import MERGES, TRANSFORMS
from worker.engine.methods.base import Site, Statistic, make_statistics, schedule
from worker.engine.methods.dare import draw_key
from worker.engine.methods.statistics.magnitude_rank import MagnitudeRank
from worker.engine.planning.options import GraftOptions, base_role, delta_role, finetuned_role
from worker.engine.planning.plan import OutputTensor, Plan, Segment, build_plan
from worker.engine.planning.recipe import Recipe, layer_position, rule_for, transform_at, weight_at
from worker.engine.storage.model import ResolvedModel


@dataclass
class DiffUse:
    """One diff's part in one output tensor."""

    index: int
    weight: float
    transform: BaseModel | None
    stats: dict[type, Statistic] = field(default_factory=dict)  # what its transform needs, by kind
    key: int = 0
    kept: int = 0
    seen: int = 0

    def to_dict(self) -> dict:
        out = {"diff": self.index, "weight": self.weight,
               "transform": self.transform.model_dump(by_alias=True) if self.transform else None}
        if self.seen:
            rank = self.stats.get(MagnitudeRank)
            kept = rank.window.high - rank.window.low if rank is not None else self.kept
            out["kept_fraction"] = round(kept / self.seen, 6)
        return out


@dataclass
class MergeContext:
    """Everything the compute pass needs beyond the plan: per tensor, the diffs that make it."""

    method: object
    params: BaseModel
    uses: dict[str, list[DiffUse]]
    tensor_stats: dict[str, dict[type, Statistic]] = field(default_factory=dict)  # the merge's, per tensor
    rows: dict[str, int] = field(default_factory=dict)  # tensors computed in whole rows -> row length
    tallies: dict[str, dict] = field(default_factory=dict)

    def statistics(self) -> list[tuple[str, Statistic]]:
        """(tensor, statistic) of every statistic to gather before the compute pass."""
        out = [(name, st) for name, stats in self.tensor_stats.items() for st in stats.values()]
        return out + [(name, st) for name, uses in self.uses.items() for u in uses for st in u.stats.values()]

    def passes(self) -> int:
        """Reads of the inputs the statistics take before the compute pass."""
        return schedule([st for _name, st in self.statistics()])[1]

    def plain_alpha(self, name: str) -> float | None:
        """The alpha of a merged tensor that is the plain transfer (one diff, a sum without normalize, no
        transform): weight * lambda, as the plain path multiplies."""
        uses = self.uses[name]
        if (len(uses) == 1 and uses[0].transform is None and self.params.method == "sum"
                and not self.params.normalize and not self.tensor_stats.get(name)):
            return uses[0].weight * self.params.lambda_
        return None

    def summary(self) -> dict:
        """What the plan says of the recipe: the merge, and how many tensors each diff contributes to."""
        counts: dict[int, int] = {}
        for uses in self.uses.values():
            for u in uses:
                counts[u.index] = counts.get(u.index, 0) + 1
        return {"merge": self.params.model_dump(by_alias=True), "merged_tensors": len(self.uses),
                "tensors_per_diff": [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)],
                "statistics_passes": self.passes()}

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
    if recipe.plain_alpha() is None:
        # The plain transfer keeps its own rule: a model_type change is the inspection's to judge (headers
        # level), and the graft adds by name as it always has. A recipe's inputs must share the architecture.
        _check_architectures(recipe, models)
    plans = [build_plan(target, models[d.source_base], models[d.source_finetuned], options) for d in recipe.diffs]
    for diff_plan, d in zip(plans, recipe.diffs, strict=True):
        if d.diff is not None:
            _read_through_artifact(diff_plan, models[d.source_finetuned].artifact)
    plan = plans[0]
    by_name = [{t.name: t for t in p.tensors} for p in plans]
    method = MERGES[recipe.merge.method]
    _check_method(recipe, method)
    default = method.default_transform(recipe.merge)
    layers = _layers(target.config)
    if recipe.layers is not None and layers != recipe.layers:
        raise GraftError("invalid_recipe", f"layers: the recipe is written for {recipe.layers} layers (its "
                         f"layer_range), the target has {layers}", {"field": "layers"})
    merge = MergeContext(method, recipe.merge, {})
    for tensor in plan.tensors:
        made = _compose(tensor, [b.get(tensor.name) for b in by_name], recipe, default, layers)
        if made:
            _add_statistics(merge, tensor, made)
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
    return plan, merge


def _read_through_artifact(plan: Plan, artifact) -> None:
    """A diff artifact's plan, made from its recorded headers as the pair's would be, then pointed at what the
    artifact holds: transferred rows read its decoded delta (role delta.<i>, set per diff by _compose), a
    fine-tune's extra rows its stored rows. Rows it does not hold refuse the graft here, before anything is
    read; the non-float buffers the fine-tune changed were found at extraction and are said as warnings now."""
    for tensor in plan.tensors:
        if tensor.check_sources_equal:
            tensor.check_sources_equal = False
            tensor.sources = {"target_base": tensor.sources["target_base"]}
            if tensor.name in artifact.changed_buffers:
                plan.warnings.append({"code": "buffer_changed_by_finetune", "tensor": tensor.name, "message":
                                      f"{tensor.name} is not a float tensor and differs between the sources; "
                                      "the target's value was kept"})
        if tensor.action == "copied":
            continue
        sources = {"target_base": tensor.sources["target_base"], "delta": artifact.delta_info(tensor.name)}
        extra = [s for s in tensor.segments if s.op == "finetuned"]
        if extra:
            rows = artifact.rows_info(tensor.name)
            row = math.prod(tensor.shape[1:])
            first_needed = extra[0].start // max(1, row)
            if rows is None or rows[1] > first_needed:
                have = "none" if rows is None else f"rows from {rows[1]}"
                raise GraftError("vocab_mismatch", f"{tensor.name}: the output takes the fine-tune's rows from "
                                 f"{first_needed} (the target has fewer rows than the source base), and the "
                                 f"diff artifact {artifact.uri} holds {have} (its rows past the source base's); "
                                 "use vocab: target, or the source pair itself", {"tensor": tensor.name})
            sources["finetuned"] = rows[0]
        tensor.sources = sources


def _check_method(recipe: Recipe, method) -> None:
    """A merge that weighs the diffs itself (sce) takes no weights, one that merges them as they are no
    transforms: refused by field, before anything is read."""
    fields = []
    if not method.takes_weights:
        fields += [f"diffs.{i}.weight" for i, d in enumerate(recipe.diffs) if d.weight != 1.0]
        fields += [f"rules.{j}.weight" for j, r in enumerate(recipe.rules) if r.weight is not None]
    if not method.takes_transforms:
        fields += [f"diffs.{i}.transform" for i, d in enumerate(recipe.diffs) if d.transform is not None]
        fields += [f"rules.{j}.transform" for j, r in enumerate(recipe.rules) if r.transform is not None]
    if fields:
        raise GraftError("invalid_recipe", f"{fields[0]}: merge {method.name} weighs the diffs itself and takes "
                         "them untransformed (as mergekit's does): no weight other than 1, no transform",
                         {"field": fields[0], "fields": fields})


def _add_statistics(merge: MergeContext, tensor: OutputTensor, uses: list[DiffUse]) -> None:
    """The tensor's diffs and the statistics their methods declare (per diff, then the merge's per tensor)."""
    span = sum(s.stop - s.start for s in tensor.segments if s.op == "merge")
    merge.uses[tensor.name] = uses
    for k, use in enumerate(uses):
        if use.transform is not None:
            seed = getattr(use.transform, "seed", 0)
            use.key = draw_key(seed, f"{use.index}\x00{tensor.name}")
            use.stats = make_statistics(TRANSFORMS[use.transform.method], use.transform,
                                        Site(span, tensor.shape, len(uses), k, use.key))
    stats = make_statistics(merge.method, merge.params, Site(span, tensor.shape, len(uses)))
    if stats:
        merge.tensor_stats[tensor.name] = stats
    every = [*stats.values(), *(st for u in uses for st in u.stats.values())]
    if any(st.whole_rows for st in every):
        merge.rows[tensor.name] = math.prod(tensor.shape[1:]) if len(tensor.shape) >= 2 else max(1, span)


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
        own = per_diff[i].sources
        if recipe.diffs[i].diff is None:
            sources[base_role(i)], sources[finetuned_role(i)] = own["source_base"], own["source_finetuned"]
        else:  # an artifact (_read_through_artifact): its delta, and its fine-tune's extra rows if read
            sources[delta_role(i)] = own["delta"]
            if "finetuned" in own:
                sources[finetuned_role(i)] = own["finetuned"]
    tensor.sources = sources
    tensor.segments = [Segment("merge", s.start, s.stop) if s.op == "transfer" else
                       Segment(f"finetuned.{contributing[0]}" if s.op == "finetuned" else s.op, s.start, s.stop)
                       for s in first.segments]
    tensor.compute_dtype = "F64" if any(i.dtype == "F64" for i in sources.values()) else "F32"
    return uses
