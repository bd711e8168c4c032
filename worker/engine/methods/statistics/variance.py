"""SCE's selection (mergekit 0.1.5's sce_mask): per element, the population variance of the diffs' deltas; the
k = int(nonzero * select_topk) elements of largest variance are kept in every diff (nonzero: the elements
whose variance is not 0; the product in float32, as torch forms it), the rest zeroed.

The variance is torch.var's (unbiased=False) float32 value bit for bit: Welford's update in float64 over the
diffs in order, rounded once (what torch's CPU kernel does), from elementwise float64 operations that every
device rounds alike. Ranks are exact (a radix select over two reads); elements of equal variance at the
threshold are taken in element order, where mergekit's topk takes any of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engine.methods.base import RankWindow, Statistic, f32
from worker.engine.methods.statistics.rank_select import RankSelect

if TYPE_CHECKING:
    import torch


def variance_bits(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The float32 bit patterns (int32) of each element's population variance across `deltas`."""
    import torch

    mean = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    m2 = torch.zeros_like(mean)
    for i, delta in enumerate(deltas):
        x = delta.double()
        step = x - mean
        mean += step / (i + 1)
        m2 += step * (x - mean)
    return (m2 / len(deltas)).float().view(torch.int32)


class VarianceRank(Statistic):
    reads = 2

    def __init__(self, site, earlier, topk: float) -> None:
        super().__init__(site, earlier)
        self.topk = topk
        self.nonzero = 0
        self.window = RankWindow(0, 0)
        self._select = RankSelect([self.window])

    @classmethod
    def create(cls, method, params, site, earlier):
        topk = method.select_topk(params)
        return cls(site, earlier, topk) if topk < 1 else None

    def add(self, read, deltas, start, scratch) -> None:
        import torch

        bits = variance_bits([deltas[k] for k in self.diffs])
        if read == 0:
            self.nonzero += int(torch.count_nonzero(bits))
            self._select.add_coarse(bits)
        else:
            self._select.add_fine(bits)

    def finish(self, read) -> None:
        if read == 0:
            self.window.high = int(f32(f32(self.nonzero) * f32(self.topk)))
            self._select.finish_coarse()
        else:
            self._select.finish_fine()

    def rewind(self) -> None:
        self.window.rewind()

    def select(self, deltas: list[torch.Tensor]) -> None:
        """Zero, in place, every diff's elements outside the selection (one chunk, walked in index order)."""
        keep = self.window.keep(variance_bits(deltas)).to(deltas[0].dtype)
        for delta in deltas:
            delta.mul_(keep)
