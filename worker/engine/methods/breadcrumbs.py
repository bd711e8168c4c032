"""`breadcrumbs`: drop the largest `gamma` of each tensor's |delta| (outliers) and keep the next `density`.

With n elements, top = int(gamma * n) and keep = int(density * n) (Python's float product, truncated), the
window of descending magnitude ranks (ties broken by element index) kept is:

- `semantics: graft` (the default, graft's own recipes): [top, top + keep), cut at n. The outliers asked for
  are always dropped, and density is an upper bound: where gamma + density passes 1 fewer than `keep` remain.
  With top = 0 (gamma = 0, or gamma * n < 1) nothing is dropped as an outlier and the `keep` largest stay.
- `semantics: mergekit` (what `breadcrumbs` / `breadcrumbs_ties` configs map to): magnitude_outliers of
  mergekit 0.1.5 as released (its sparsify.py: `n_bot = max(0, n - keep - top)`, then
  `indices[n_bot : n_bot + keep]` of the ascending sort), rounding edges included. A density of 1 or more
  leaves the delta as it is; where n - keep - top < 0, fewer outliers are dropped to keep the density, so
  the window is [n - keep, n); otherwise [top, top + keep). (Its repository's older
  `indices[n_bot:-n_top]` kept nothing when top = 0; the release does not, and neither does this.)

`rescale` (mergekit's, off by default): the kept elements scaled back to the delta's L1 norm.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.methods.base import RankWindow, TransformMethod, later_field
from worker.engine.methods.magnitude import RESCALE_L1, zero_outside_window
from worker.engine.methods.statistics.l1 import L1Rescale
from worker.engine.methods.statistics.magnitude_rank import MagnitudeRank


class BreadcrumbsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["breadcrumbs"]
    density: float = Field(gt=0, le=1, description="fraction kept below the dropped outliers")
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of the largest |delta| dropped as outliers")
    semantics: Literal["graft", "mergekit"] = Field(
        "graft", description="graft: always drop int(gamma * n) outliers, keep at most int(density * n); "
        "mergekit: mergekit 0.1.5's magnitude_outliers exactly (fewer outliers dropped where gamma + density "
        "passes 1), what mergekit configs map to")
    rescale: bool = later_field(False, RESCALE_L1)


class Breadcrumbs(TransformMethod):
    name = "breadcrumbs"
    Params = BreadcrumbsParams
    statistics = (MagnitudeRank, L1Rescale)

    def window(self, params: BreadcrumbsParams, numel: int) -> RankWindow | None:
        keep, top = int(params.density * numel), int(params.gamma * numel)
        if params.semantics == "graft":
            return RankWindow(min(top, numel), min(numel, top + keep))
        if params.density >= 1:
            return None
        bottom = max(0, numel - keep - top)  # the smallest, dropped; then `keep` kept above them
        return RankWindow(numel - bottom - keep, numel - bottom)

    def l1_rescale(self, params: BreadcrumbsParams) -> bool:
        # mergekit's magnitude_outliers returns a delta of density 1 as it is, unscaled.
        return params.rescale and (params.semantics == "graft" or params.density < 1)

    def apply(self, delta, params, chunk):
        zero_outside_window(delta, chunk)
        return None
