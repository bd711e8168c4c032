"""`magnitude`: keep the `density` largest |delta| of each tensor (TIES' trim), as mergekit does:
k = max(1, int(density * numel)); ties at the threshold are kept in element order. `rescale` (mergekit's,
off by default): the trimmed delta scaled back to the delta's L1 norm (worker/engine/methods/statistics/l1.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import RankWindow, TransformMethod, later_field
from worker.engine.methods.statistics.l1 import L1Rescale
from worker.engine.methods.statistics.magnitude_rank import MagnitudeRank

RESCALE_L1 = "mergekit's rescale: the kept elements scaled so that the delta keeps its L1 norm"


class MagnitudeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude"]
    density: float = Field(gt=0, le=1, description="fraction of each tensor's delta kept, by magnitude")
    rescale: bool = later_field(False, RESCALE_L1)


def zero_outside_window(delta, chunk) -> None:
    """Zero what the diff's magnitude window leaves out (no window: the transform keeps everything)."""
    rank = chunk.stats.get(MagnitudeRank)
    if rank is not None:
        rank.window.zero_outside(delta, chunk.scratch("spare"))


class Magnitude(TransformMethod):
    name = "magnitude"
    Params = MagnitudeParams
    statistics = (MagnitudeRank, L1Rescale)

    def window(self, params: MagnitudeParams, numel: int) -> RankWindow | None:
        k = min(numel, max(1, int(params.density * numel)))
        return None if k >= numel else RankWindow(0, k)

    def l1_rescale(self, params: MagnitudeParams) -> bool:
        return params.rescale and params.density < 1

    def apply(self, delta, params, chunk):
        zero_outside_window(delta, chunk)
        return None
