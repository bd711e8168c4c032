"""`sce` (mergekit 0.1.5's sce merge): Select the elements of largest variance across the diffs (`select_topk`,
the fraction kept; worker/engine/methods/statistics/variance.py), Calculate each diff's weight as its mean
square over the tensor after the selection over the sum of them (statistics/squares.py), Erase the entries
whose sign disagrees with the elected one (the sign of the sum of the selected deltas, 0 counting as +; a
zero never agrees), and add sum(weight_i * delta_i * agrees_i) / max(sum(weight_i * agrees_i), 1e-6).

Every step in float32 in mergekit's order (sums over the diffs in diff order): deterministic, so graft agrees
with mergekit's float32 run within an ulp of the output. mergekit's sce takes no per-diff weight and no
sparsification: the diffs' weights must be 1 and they take no transform. `lambda` (graft's; mergekit has none,
i.e. 1) scales the merged delta, as the alpha of a sweep does."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import INT8_MASK, MergeMethod, f32
from worker.engine.methods.statistics.squares import Squares
from worker.engine.methods.statistics.variance import VarianceRank

MIN_DIVISOR = f32(1e-6)  # mergekit's clamp of the agreeing weights' sum


class SceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["sce"]
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of the elements kept, by variance across "
                               "the diffs")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")
    int8_mask: bool = Field(False, description=INT8_MASK)


class Sce(MergeMethod):
    name = "sce"
    Params = SceParams
    statistics = (VarianceRank, Squares)
    takes_weights = False
    takes_transforms = False

    def select_topk(self, params: SceParams) -> float:
        return params.select_topk

    def combine(self, out, deltas, weights, params: SceParams, chunk):
        import torch

        selection = chunk.stats.get(VarianceRank)
        if selection is not None:
            selection.select(deltas)
        tv_weights = chunk.stats[Squares].weights
        total = chunk.scratch("total").copy_(deltas[0])
        for delta in deltas[1:]:
            total.add_(delta)
        sign = torch.ge(total, 0, out=chunk.scratch("sign")).mul_(2).sub_(1)  # the elected sign, 0 counting as +
        merged, divisor, part = total.zero_(), chunk.scratch("divisor").zero_(), chunk.scratch("part")
        for delta, w in zip(deltas, tv_weights, strict=True):
            erased = torch.eq(torch.sign(delta, out=part), sign, out=part).mul_(w)  # weight where it agrees
            divisor.add_(erased)
            merged.add_(delta.mul_(erased))
        merged.div_(divisor.clamp_(min=MIN_DIVISOR))
        if params.lambda_ != 1.0:
            merged.mul_(params.lambda_)
        out.add_(merged)
