"""`breadcrumbs`: drop the largest `gamma` of each tensor's |delta| (outliers) and keep the next `density`,
as mergekit's magnitude_outliers does: n_top = int(gamma * numel), keep = int(density * numel), i.e. the
descending magnitude ranks [n_top, n_top + keep)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import RankWindow, TransformMethod


class BreadcrumbsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["breadcrumbs"]
    density: float = Field(gt=0, le=1, description="fraction kept below the dropped outliers")
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of the largest |delta| dropped as outliers")


class Breadcrumbs(TransformMethod):
    name = "breadcrumbs"
    Params = BreadcrumbsParams

    def window(self, params: BreadcrumbsParams, numel: int) -> RankWindow | None:
        top = int(params.gamma * numel)
        return RankWindow(min(top, numel), min(numel, top + int(params.density * numel)))

    def apply(self, delta, params, *, window, key, start, spare):
        window.zero_outside(delta, spare)
        return None
