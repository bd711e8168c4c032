"""What a transform and a merge provide to the engine."""

from __future__ import annotations

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
    ties_seen: dict[int, int] = field(default_factory=dict)

    def selected(self, mag_bits: torch.Tensor, k: int) -> torch.Tensor:
        """Members of the top-k among this chunk's elements (int32 bits of |delta|), in index order."""
        import torch

        if k <= 0:
            return torch.zeros_like(mag_bits, dtype=torch.bool)
        value = self.value_bits[k]
        greater = mag_bits > value
        equal = mag_bits == value
        budget = k - self.above[k]
        seen = self.ties_seen.get(k, 0)
        if budget <= seen:
            self.ties_seen[k] = seen + int(equal.sum())
            return greater
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
              start: int) -> torch.Tensor | None:
        """The kept mask of one chunk of the tensor's delta (float32), elements [start, start + n), or None
        to keep all; `key` identifies (seed, tensor) for methods that draw. Scales `delta` in place where the
        method rescales."""
        raise NotImplementedError


class MergeMethod:
    """How the diffs of one tensor combine into the delta added to the target."""

    name: str
    Params: type[BaseModel]

    def default_transform(self, params: BaseModel) -> BaseModel | None:
        """The transform every diff gets unless it names its own (TIES trims by magnitude)."""
        return None

    def combine(self, out: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], params: BaseModel,
                tally: dict) -> None:
        """out += merged delta (all float32 chunks of one length); `tally` collects per-tensor statistics."""
        raise NotImplementedError
