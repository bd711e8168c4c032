"""`magnitude`: keep the `density` largest |delta| of each tensor (TIES' trim), as mergekit does:
k = max(1, int(density * numel)); ties at the threshold are kept in element order."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import RankWindow, TransformMethod


class MagnitudeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude"]
    density: float = Field(gt=0, le=1, description="fraction of each tensor's delta kept, by magnitude")


class Magnitude(TransformMethod):
    name = "magnitude"
    Params = MagnitudeParams

    def window(self, params: MagnitudeParams, numel: int) -> RankWindow | None:
        k = min(numel, max(1, int(params.density * numel)))
        return None if k >= numel else RankWindow(0, k)

    def apply(self, delta, params, *, window, key, start, spare):
        if window is not None:
            window.zero_outside(delta, spare)
        return None
