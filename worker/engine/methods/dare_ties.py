"""`dare_ties`: DARE on each delta (keep probability `density`; `rescale` as dare's: by default survivors divided
by the density), then the TIES sign vote and disjoint mean."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import INT8_MASK, MergeMethod, later_field
from worker.engine.methods.dare import RESCALE_DARE, DareParams
from worker.engine.methods.ties import elect


class DareTiesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["dare_ties"]
    density: float = Field(gt=0, le=1, description="probability that an element of each delta is kept")
    seed: int = Field(0, ge=0, lt=2**32, description="the draw's seed")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")
    rescale: Literal["inverse", True, False] = later_field("inverse", RESCALE_DARE)
    int8_mask: bool = later_field(False, INT8_MASK)


class DareTies(MergeMethod):
    name = "dare_ties"
    Params = DareTiesParams

    def default_transform(self, params: DareTiesParams) -> BaseModel | None:
        if params.density >= 1:
            return None
        return DareParams(method="dare", drop=1.0 - params.density, seed=params.seed, rescale=params.rescale)

    def combine(self, out, deltas, weights, params: DareTiesParams, chunk):
        elect(out, deltas, weights, params.normalize, params.lambda_, chunk)
