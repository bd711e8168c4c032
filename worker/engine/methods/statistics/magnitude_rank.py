"""A diff's window of magnitude ranks (keep the elements whose descending |delta| rank lies in [low, high)),
exact: a radix select over two reads of the diff (worker/engine/methods/statistics/rank_select.py)."""

from __future__ import annotations

from worker.engine.methods.base import RankWindow, Statistic, magnitude_bits
from worker.engine.methods.statistics.rank_select import RankSelect


class MagnitudeRank(Statistic):
    """The window a transform's `window(params, numel)` asks for; its thresholds once both reads are done."""

    reads = 2

    def __init__(self, site, earlier, window: RankWindow) -> None:
        super().__init__(site, earlier)
        self.window = window
        self._select = RankSelect([window])

    @classmethod
    def create(cls, method, params, site, earlier):
        window = method.window(params, site.numel)
        return None if window is None else cls(site, earlier, window)

    def add(self, read, deltas, start, scratch) -> None:
        bits = magnitude_bits(deltas[self.site.diff])
        (self._select.add_coarse if read == 0 else self._select.add_fine)(bits)

    def finish(self, read) -> None:
        (self._select.finish_coarse if read == 0 else self._select.finish_fine)()

    def rewind(self) -> None:
        self.window.rewind()
