"""What a transform and a merge provide to the engine."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch


@dataclass
class RankWindow:
    """Keep the elements whose rank by |delta| (descending; ties broken by element index, ascending) lies in
    [low, high). Thresholds come from the statistics pass; the tie counters advance as the compute pass walks
    the tensor in index order."""

    low: int
    high: int
    # Filled by the statistics pass: per rank k in (low, high), the k-th largest |delta| (float32 bits) and how
    # many elements are strictly larger; k = 0 selects nothing.
    value_bits: dict[int, int] = field(default_factory=dict)
    above: dict[int, int] = field(default_factory=dict)
    ties_total: dict[int, int] = field(default_factory=dict)  # elements equal to the k-th value
    ties_seen: dict[int, int] = field(default_factory=dict)

    def _shrink(self, k: int) -> float | None:
        """The hardshrink threshold that selects the top-k in this chunk without counting ties (|x| > it
        is kept), or None when ties at the threshold must be counted here. `-1` keeps everything."""
        if k <= 0:
            return math.inf
        value = self.value_bits[k]
        budget, seen = k - self.above[k], self.ties_seen.get(k, 0)
        if budget <= seen:  # every tie that rank k takes is placed: strictly greater only
            return _float(value)
        if budget - seen >= self.ties_total.get(k, 0) - seen:  # every remaining tie is taken
            return _float(value - 1) if value > 0 else -1.0
        return None

    def zero_outside(self, delta: torch.Tensor, spare: torch.Tensor) -> None:
        """Zero, in place, the float32 chunk's elements outside the window, walking the tensor in index order.
        One or two fused hardshrinks where the chunk's ties are decided; counted ties otherwise."""
        import torch

        if self.high <= self.low:
            delta.zero_()
            return
        high, low = self._shrink(self.high), self._shrink(self.low)
        if high is None or low is None or delta.dtype != torch.float32:  # float64 ranks by float32 bits
            delta.mul_(self.keep(magnitude_bits(delta)))
            return
        if low == math.inf:  # the window starts at the top (magnitude): one pass
            torch.hardshrink(delta, high, out=delta)
            return
        torch.hardshrink(delta, low, out=spare)  # above the window: removed below
        torch.hardshrink(delta, high, out=delta)
        delta.sub_(spare)

    def selected(self, mag_bits: torch.Tensor, k: int) -> torch.Tensor:
        """Members of the top-k among this chunk's elements (int32 bits of |delta|), in index order."""
        import torch

        if k <= 0:
            return torch.zeros_like(mag_bits, dtype=torch.bool)
        value = self.value_bits[k]
        greater = mag_bits > value
        budget = k - self.above[k]
        seen = self.ties_seen.get(k, 0)
        if budget <= seen:  # the ties at the threshold are all placed: later ones are never kept
            return greater
        equal = mag_bits == value
        running = torch.cumsum(equal, 0, dtype=torch.int64) + seen
        self.ties_seen[k] = int(running[-1]) if running.numel() else seen
        return greater | (equal & (running <= budget))

    def keep(self, mag_bits: torch.Tensor) -> torch.Tensor:
        if self.high <= self.low:
            # An empty window (breadcrumbs keeping int(density * n) = 0): selecting rank `low` twice would
            # advance its tie counter twice and keep the tie at the threshold.
            return self.selected(mag_bits, 0)
        top = self.selected(mag_bits, self.high)
        return top if self.low <= 0 else top & ~self.selected(mag_bits, self.low)


def _float(bits: int) -> float:
    """The float32 whose bit pattern is `bits` (non-negative), as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as int32 that sort like the values (non-negative IEEE floats do): exact comparisons and
    histograms without rounding. Float64 deltas are ranked by their float32 rounding."""
    import torch

    mag = delta.abs()
    return (mag if mag.dtype == torch.float32 else mag.float()).view(torch.int32)


class TransformMethod:
    """A per-diff, per-tensor rewrite of the delta."""

    name: str
    Params: type[BaseModel]

    def window(self, params: BaseModel, numel: int) -> RankWindow | None:
        """The magnitude-rank window to keep (needs the statistics pass), or None."""
        return None

    def apply(self, delta: torch.Tensor, params: BaseModel, *, window: RankWindow | None, key: int,
              start: int, spare: torch.Tensor) -> int | None:
        """Rewrite one chunk of the tensor's delta in place (elements [start, start + n); dropped ones become
        0, survivors rescaled where the method rescales). Returns how many were kept when the method had to
        count them, None when the window's width says it. `key` names (seed, diff, tensor) for methods that
        draw; `spare` is a scratch chunk of the same shape."""
        raise NotImplementedError


class MergeMethod:
    """How the diffs of one tensor combine into the delta added to the target."""

    name: str
    Params: type[BaseModel]

    def default_transform(self, params: BaseModel) -> BaseModel | None:
        """The transform every diff gets unless it names its own (TIES trims by magnitude)."""
        return None

    def combine(self, out: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], params: BaseModel,
                tally: dict, scratch) -> None:
        """out += merged delta (float chunks of one length; the deltas may be overwritten); `tally` collects
        per-tensor statistics; `scratch(name)` lends a chunk-sized buffer."""
        raise NotImplementedError
