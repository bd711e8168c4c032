"""`sum`: weighted task arithmetic, sum(w_i * delta_i) (divided by sum(w_i) when `normalize`, unless that sum
is within 1e-8 of 0, as mergekit does: a divisor that small would amplify the deltas a hundred million times),
times `lambda`. With one diff, weight alpha and no transform this is the plain fine-tuning transfer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import MergeMethod

NEAR_ZERO = 1e-8  # mergekit's: a weights' sum below it in magnitude is not divided by


class SumParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["sum"]
    normalize: bool = Field(False, description="divide by the sum of the weights (not when it is within 1e-8 of 0)")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")


class Sum(MergeMethod):
    name = "sum"
    Params = SumParams

    def combine(self, out, deltas, weights, params: SumParams, chunk):
        weighted_sum(out, deltas, weights, params.normalize, params.lambda_)


def weighted_sum(out, deltas: list, weights: list[float], normalize: bool, lam: float) -> None:
    """out += sum(w_i * delta_i) * lambda (over sum(w_i) when normalize); the deltas are overwritten."""
    scale = lam
    total = sum(weights)
    if normalize and abs(total) >= NEAR_ZERO:
        scale /= total
    for delta, w in zip(deltas, weights, strict=True):
        if w == 0:
            continue
        if w * scale != 1.0:
            delta.mul_(w * scale)
        out.add_(delta)
