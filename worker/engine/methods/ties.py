"""`ties`: trim each delta to its `density` largest magnitudes (unless a diff names its own transform), elect a
sign per element by the summed weighted deltas (0 counts as +), keep each weighted delta whose sign agrees
(a zero never does), and add their sum divided by the agreeing weights' sum (`normalize`, on by default: the
disjoint mean) times `lambda`. As mergekit's ties with its `sum` consensus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

from .base import MergeMethod
from .magnitude import MagnitudeParams


class TiesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["ties"] = "ties"
    density: float = Field(1.0, gt=0, le=1, description="fraction of each delta kept by magnitude before the vote")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights (the disjoint mean)")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")


def elect(out: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool, scale: float,
          tally: dict) -> None:
    """The sign vote and disjoint mean shared by ties and dare_ties. `deltas` are overwritten."""
    import torch

    for delta, w in zip(deltas, weights, strict=True):
        if w != 1.0:
            delta.mul_(w)
    total = deltas[0].clone()
    for delta in deltas[1:]:  # in diff order, one add at a time: the same sums on every device
        total.add_(delta)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)  # the elected sign; 0 counts as +
    mixed, divisor = total.zero_(), None
    voters = minority = None
    for delta, w in zip(deltas, weights, strict=True):
        agreement = delta * sign  # > 0: joins; < 0: votes against; 0: does not vote
        joins = agreement > 0
        voters = agreement != 0 if voters is None else voters.logical_or_(agreement != 0)
        minority = agreement < 0 if minority is None else minority.logical_or_(agreement < 0)
        delta.mul_(joins)
        mixed.add_(delta)
        if normalize:
            divisor = joins * w if divisor is None else divisor.add_(joins, alpha=w)
    if normalize:
        divisor = divisor.to(mixed.dtype)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if scale != 1.0:
        mixed.mul_(scale)
    out.add_(mixed)
    voted = int(voters.sum())
    tally["voted"] = tally.get("voted", 0) + voted
    tally["unanimous"] = tally.get("unanimous", 0) + voted - int(minority.sum())


class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams

    def default_transform(self, params: TiesParams) -> BaseModel | None:
        return MagnitudeParams(density=params.density) if params.density < 1 else None

    def combine(self, out, deltas, weights, params: TiesParams, tally):
        elect(out, deltas, weights, params.normalize, params.lambda_, tally)
