"""Exact per-tensor magnitude thresholds without holding a tensor: a two-pass radix select over the int32
bit patterns of |delta| (non-negative floats sort like their bits). The first pass histograms the high 16
bits; the second, the low 16 bits of the elements in the bins the first pass chose. Memory: two 65,536-bin
histograms per tensor being read, whatever the tensor's size."""

from __future__ import annotations

import torch

from .methods.base import RankWindow

BINS = 1 << 16


class RankSelect:
    """Finds, for each rank k of a tensor's windows, the k-th largest |delta| and how many are larger."""

    def __init__(self, windows: list[RankWindow]) -> None:
        self.windows = windows
        self.ranks = sorted({k for w in windows for k in (w.low, w.high) if k > 0})
        self.coarse = torch.zeros(BINS, dtype=torch.int64)
        self.fine: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, tuple[int, int]] = {}  # rank -> (high bin, elements in higher bins)

    @property
    def needed(self) -> bool:
        return bool(self.ranks)

    def add_coarse(self, bits: torch.Tensor) -> None:
        self.coarse += torch.bincount((bits >> 16).long(), minlength=BINS)

    def finish_coarse(self) -> None:
        above = torch.flip(torch.cumsum(torch.flip(self.coarse, [0]), 0), [0])  # elements in bins >= b
        for k in self.ranks:
            b = int(torch.nonzero(above >= k)[-1])  # the highest bin whose tail reaches rank k
            higher = int(above[b + 1]) if b + 1 < BINS else 0
            self.chosen[k] = (b, higher)
            self.fine.setdefault(b, torch.zeros(BINS, dtype=torch.int64))
        self.coarse = None

    def add_fine(self, bits: torch.Tensor) -> None:
        high = bits >> 16
        for b, hist in self.fine.items():
            inside = bits[high == b]
            if inside.numel():
                hist += torch.bincount((inside & 0xFFFF).long(), minlength=BINS)

    def finish_fine(self) -> None:
        for k in self.ranks:
            b, higher = self.chosen[k]
            hist = self.fine[b]
            above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) + higher
            low = int(torch.nonzero(above >= k)[-1])
            value = (b << 16) | low
            strictly = int(above[low + 1]) if low + 1 < BINS else higher
            for w in self.windows:
                if k in (w.low, w.high):
                    w.value_bits[k], w.above[k] = value, strictly
        self.fine = {}
