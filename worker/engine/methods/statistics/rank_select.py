"""Exact per-tensor rank thresholds without holding a tensor: a two-pass radix select over the int32 bit
patterns of a non-negative float32 figure per element (|delta|, a variance: non-negative floats sort like
their bits). The first pass histograms the high 16 bits; the second, the low 16 bits of the elements in the
bins the first pass chose. Memory: two 65,536-bin histograms per tensor being read, whatever its size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engine.methods.base import RankWindow

if TYPE_CHECKING:
    import torch

BINS = 1 << 16


class RankSelect:
    """Finds, for each rank k of a tensor's windows, the k-th largest value and how many are larger. The
    windows may be set as late as the end of the coarse pass (a rank that depends on what it counted)."""

    def __init__(self, windows: list[RankWindow]) -> None:
        self.windows = windows
        # Histograms come into being when their tensor is first read and go when it is done: the passes make
        # a selector for every tensor up front, and 512 KB each for a model's hundreds of tensors would be the
        # model's size, not the block's, deciding the memory.
        self.coarse: torch.Tensor | None = None
        self.fine: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, tuple[int, int]] = {}  # rank -> (high bin, elements in higher bins)

    def add_coarse(self, bits: torch.Tensor) -> None:
        import torch

        counts = torch.bincount(bits >> 16, minlength=BINS)  # int32 bins: no int64 copy of the chunk
        self.coarse = counts if self.coarse is None else self.coarse.add_(counts)

    @property
    def ranks(self) -> list[int]:
        return sorted({k for w in self.windows for k in (w.low, w.high) if k > 0})

    def finish_coarse(self) -> None:
        import torch

        coarse = self.coarse if self.coarse is not None else torch.zeros(BINS, dtype=torch.int64)  # no elements
        above = torch.flip(torch.cumsum(torch.flip(coarse, [0]), 0), [0])  # elements in bins >= b
        self.chosen = {}
        for k in self.ranks:
            b = int(torch.nonzero(above >= k)[-1])  # the highest bin whose tail reaches rank k
            higher = int(above[b + 1]) if b + 1 < BINS else 0
            self.chosen[k] = (b, higher)
        self.coarse = None

    def add_fine(self, bits: torch.Tensor) -> None:
        import torch

        for b in {b for b, _ in self.chosen.values()}:
            # Offsets into bin b, with everything outside it clamped onto two sentinel bins (no boolean
            # mask, no gather: integer arithmetic and one bincount).
            rel = torch.sub(bits, (b << 16) - 1).clamp_(0, BINS + 1)
            counts = torch.bincount(rel, minlength=BINS + 2)[1:BINS + 1]
            self.fine[b] = self.fine[b].add_(counts) if b in self.fine else counts.clone()

    def finish_fine(self) -> None:
        import torch

        for k in self.ranks:
            b, higher = self.chosen[k]
            hist = self.fine[b]  # bin b holds the k-th element: it was read
            above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) + higher
            low = int(torch.nonzero(above >= k)[-1])
            value = (b << 16) | low
            strictly = int(above[low + 1]) if low + 1 < BINS else higher
            for w in self.windows:
                if k in (w.low, w.high):
                    w.value_bits[k], w.above[k], w.ties_total[k] = value, strictly, int(hist[low])
        self.fine = {}
