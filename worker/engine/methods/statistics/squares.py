"""SCE's weights (mergekit 0.1.5's sce_weight): each diff's mean square over the whole tensor, after the
variance selection when there is one, over their sum; 1 / diffs each when that sum is below 1e-6.

The squares are float32 (as mergekit squares them) summed in float64, and the means and their ratios formed
in float32; mergekit sums in float32, so a weight may differ from mergekit's by an ulp of float32."""

from __future__ import annotations

from worker.engine.methods.base import Statistic, f32
from worker.engine.methods.statistics.variance import VarianceRank


class Squares(Statistic):
    def __init__(self, site, earlier) -> None:
        super().__init__(site, earlier)
        self.selection: VarianceRank | None = earlier.get(VarianceRank)
        self.sums = [0.0] * site.diffs
        self.weights = [f32(1.0 / site.diffs)] * site.diffs

    def add(self, read, deltas, start, scratch) -> None:
        import torch

        chosen = [scratch(f"squares{k}").copy_(deltas[k]) for k in self.diffs]
        if self.selection is not None:
            self.selection.select(chosen)
        for k, x in zip(self.diffs, chosen, strict=True):
            self.sums[k] += float(x.float().square_().sum(dtype=torch.float64))

    def finish(self, read) -> None:
        n = f32(max(1, self.site.numel))
        means = [f32(f32(s) / n) for s in self.sums]
        total = 0.0
        for m in means:
            total = f32(total + m)
        if abs(total) >= 1e-6:
            self.weights = [f32(m / total) for m in means]
