"""`ties`: trim each delta to its `density` largest magnitudes (unless a diff names its own transform), elect a
sign per element by the summed weighted deltas (0 counts as +), keep each weighted delta whose sign agrees
(a zero never does), and add their sum divided by the agreeing weights' sum (`normalize`, on by default: the
disjoint mean) times `lambda`. As mergekit's ties with its `sum` consensus; `rescale` (mergekit's, off by
default) scales each trimmed delta back to its L1 norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

from worker.engine.methods.base import INT8_MASK, Chunk, MergeMethod, later_field
from worker.engine.methods.magnitude import RESCALE_L1, MagnitudeParams


class TiesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["ties"]
    density: float = Field(1.0, gt=0, le=1, description="fraction of each delta kept by magnitude before the vote")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights (the disjoint mean)")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")
    rescale: bool = later_field(False, RESCALE_L1)
    int8_mask: bool = later_field(False, INT8_MASK)


def elect(out: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool, scale: float,
          chunk: Chunk) -> None:
    """The sign vote and disjoint mean shared by ties and dare_ties; `deltas` are overwritten.

    Float arithmetic only (comparisons into float outputs, ReLUs): boolean tensors cost several times more
    per element here. With s = +1 where sum(v) >= 0, else -1, the joining part of v is relu(v * s) * s, and
    adding the magnitudes of values that share a sign rounds exactly as adding the values."""
    import torch

    tally, scratch = chunk.tally, chunk.scratch
    for delta, w in zip(deltas, weights, strict=True):
        if w != 1.0:
            delta.mul_(w)
    total = scratch("total").copy_(deltas[0])
    for delta in deltas[1:]:  # in diff order, one add at a time: the same sums on every device
        total.add_(delta)
    sign = torch.ge(total, 0, out=scratch("sign")).mul_(2).sub_(1)  # the elected sign; 0 counts as +
    joined, against = total.zero_(), scratch("against").zero_()
    divisor = scratch("divisor").zero_() if normalize else None
    part = scratch("part")
    for delta, w in zip(deltas, weights, strict=True):
        agreement = delta.mul_(sign)  # > 0: joins; < 0: votes against; 0: no vote
        if divisor is not None:
            divisor.add_(torch.gt(agreement, 0, out=part), alpha=w)
        against.add_(torch.clamp(agreement, max=0, out=part))
        joined.add_(agreement.clamp_(min=0))
    votes = torch.gt(torch.sub(joined, against, out=part), 0, out=part)  # anyone voted: |v| summed > 0
    tally["voted"] = tally.get("voted", 0) + int(votes.sum())
    tally["unanimous"] = tally.get("unanimous", 0) + int(votes.sum()) - int(torch.lt(against, 0, out=part).sum())
    joined.mul_(sign)
    if divisor is not None:
        if min(weights) > 0:  # a zero divisor means nothing joined, and 0 / tiny is 0
            divisor.clamp_(min=torch.finfo(divisor.dtype).tiny)
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        joined.div_(divisor)
    if scale != 1.0:
        joined.mul_(scale)
    out.add_(joined)


class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams

    def default_transform(self, params: TiesParams) -> BaseModel | None:
        if params.density >= 1:
            return None
        return MagnitudeParams(method="magnitude", density=params.density, rescale=params.rescale)

    def combine(self, out, deltas, weights, params: TiesParams, chunk):
        elect(out, deltas, weights, params.normalize, params.lambda_, chunk)
