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
    """The sign vote and disjoint mean shared by ties and dare_ties. `deltas` are scaled in place."""
    import torch

    for delta, w in zip(deltas, weights, strict=True):
        delta.mul_(w)
    total = deltas[0].clone()
    for delta in deltas[1:]:  # in diff order, one add at a time: the same sums on every device
        total.add_(delta)
    majority = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(out)
    divisor = torch.zeros_like(out)
    agree_all = torch.ones_like(out, dtype=torch.bool)
    voters = torch.zeros_like(out, dtype=torch.bool)
    for delta, w in zip(deltas, weights, strict=True):
        nonzero = delta != 0
        joins = nonzero & (torch.sign(delta) == majority)
        mixed.add_(torch.where(joins, delta, 0.0))
        if normalize:
            divisor.add_(joins.to(out.dtype) * w)
        agree_all &= joins | ~nonzero
        voters |= nonzero
    if normalize:
        divisor[divisor == 0] = 1.0
        mixed.div_(divisor)
    if scale != 1.0:
        mixed.mul_(scale)
    out.add_(mixed)
    tally["voted"] = tally.get("voted", 0) + int(voters.sum())
    tally["unanimous"] = tally.get("unanimous", 0) + int((agree_all & voters).sum())


class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams

    def default_transform(self, params: TiesParams) -> BaseModel | None:
        return MagnitudeParams(density=params.density) if params.density < 1 else None

    def combine(self, out, deltas, weights, params: TiesParams, tally):
        elect(out, deltas, weights, params.normalize, params.lambda_, tally)
