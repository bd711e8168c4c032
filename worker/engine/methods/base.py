"""What a transform, a merge and a whole-tensor statistic provide to the engine."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import torch


INT8_MASK = "mergekit's mask dtype (int8 rather than the compute dtype): accepted, the same result"


def later_field(default: bool, description: str):
    """A parameter added after recipes were first recorded: dumped (manifests, previews, the mergekit mapping)
    only when set away from its default, so that what an older recipe records reads as it did."""
    return Field(default, description=description, exclude_if=lambda value: value is default)


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

    def rewind(self) -> None:
        """Before a pass that walks the tensor again: no tie at a threshold placed yet."""
        self.ties_seen.clear()

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


def f32(x: float) -> float:
    """x rounded to the nearest float32, as a Python float (inf past float32's range). An operation on float32
    values done in float64 and rounded so is the float32 operation: float64 holds its exact result closely
    enough that the second rounding changes nothing (for +, -, * and /)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as int32 that sort like the values (non-negative IEEE floats do): exact comparisons and
    histograms without rounding. Float64 deltas are ranked by their float32 rounding."""
    import torch

    mag = delta.abs()
    return (mag if mag.dtype == torch.float32 else mag.float()).view(torch.int32)


@dataclass(frozen=True)
class Site:
    """Where a statistic is gathered: one tensor's merged elements, and one of its diffs (`diff`: the position
    among the tensor's diffs) or all of them (`diff` None)."""

    numel: int
    shape: tuple[int, ...]
    diffs: int
    diff: int | None = None
    key: int = 0  # the diff's draw stream (seed, diff, tensor)

    @property
    def row(self) -> int:
        """Elements per row: a matrix's last dimensions; a vector is one row."""
        return math.prod(self.shape[1:]) if len(self.shape) >= 2 else max(1, self.numel)


class Statistic:
    """A whole-tensor figure that a method needs before its tensor is computed (a magnitude threshold, a norm,
    a selection), gathered by reading the tensor's merged elements `reads` times, in index order, before the
    compute pass. A method declares the kinds it needs as data (its class's `statistics`, in order: each is
    gathered after those declared before it); the plan makes one per diff (a transform's) or per tensor (a
    merge's) and the pass runner (worker/engine/compute/statistics_pass.py) schedules the reads.

    `reads` 0: nothing to read ahead; `whole_rows`: every piece (and chunk) of the tensor holds whole rows,
    for a method that computes over rows as it goes."""

    reads: int = 1
    whole_rows: bool = False

    def __init__(self, site: Site, earlier: dict[type, Statistic]) -> None:
        self.site = site
        self.after = tuple(earlier.values())  # finished before this one's first read
        self.diffs = tuple(range(site.diffs)) if site.diff is None else (site.diff,)

    @classmethod
    def create(cls, method: object, params: BaseModel, site: Site, earlier: dict[type, Statistic]
               ) -> Statistic | None:
        """The statistic a method with these parameters needs at this site, or None (nothing to gather)."""
        return cls(site, earlier)

    def add(self, read: int, deltas: dict[int, torch.Tensor], start: int, scratch: Callable[[str], torch.Tensor]
            ) -> None:
        """One chunk of read `read`: `deltas` maps each position in `self.diffs` to its delta over elements
        [start, start + n) (read-only: copy into `scratch(name)` to change one)."""

    def finish(self, read: int) -> None:
        """The tensor's last chunk of read `read` was added."""

    def rewind(self) -> None:
        """Before any pass that applies the statistic again (tie counters walk the tensor from its start)."""

    def adjust(self, delta: torch.Tensor) -> None:
        """Called on a diff's transformed delta chunk in the compute pass (a rescale); nothing by default."""


def make_statistics(method: object, params: BaseModel, site: Site) -> dict[type, Statistic]:
    """The statistics `method` declares, made for one site (a class with nothing to gather is left out)."""
    made: dict[type, Statistic] = {}
    for kind in getattr(method, "statistics", ()):
        stat = kind.create(method, params, site, dict(made))
        if stat is not None:
            made[kind] = stat
    return made


def schedule(stats: list[Statistic]) -> tuple[dict[int, int], int]:
    """The read each statistic starts at (by id) and the number of reads in all: a statistic starts once those
    it comes after are finished."""
    first: dict[int, int] = {}

    def start(stat: Statistic) -> int:
        if id(stat) not in first:
            first[id(stat)] = max((start(s) + s.reads for s in stat.after), default=0)
        return first[id(stat)]

    total = max((start(s) + s.reads for s in stats), default=0)
    return first, total


@dataclass
class Chunk:
    """What a transform or a merge may use on one chunk of a tensor: where it starts, scratch of its shape, the
    tensor's row length, the diff's draw stream and the finished statistics (the diff's for a transform, the
    tensor's for a merge), and the per-tensor tally a merge reports in the manifest."""

    start: int
    scratch: Callable[[str], torch.Tensor]
    row: int = 1
    key: int = 0
    stats: dict[type, Statistic] = field(default_factory=dict)
    tally: dict = field(default_factory=dict)


class TransformMethod:
    """A per-diff, per-tensor rewrite of the delta."""

    name: str
    Params: type[BaseModel]
    statistics: tuple[type[Statistic], ...] = ()  # what it needs gathered before the compute pass

    def window(self, params: BaseModel, numel: int) -> RankWindow | None:
        """The magnitude-rank window to keep (the MagnitudeRank statistic asks), or None."""
        return None

    def l1_rescale(self, params: BaseModel) -> bool:
        """Whether the transformed delta is scaled back to the delta's L1 norm (mergekit's `rescale`; the
        L1Rescale statistic asks)."""
        return False

    def apply(self, delta: torch.Tensor, params: BaseModel, chunk: Chunk) -> int | None:
        """Rewrite one chunk of the tensor's delta in place (elements [chunk.start, chunk.start + n); dropped
        ones become 0, survivors rescaled where the method itself rescales). Returns how many were kept when
        the method had to count them, None when its window's width says it."""
        raise NotImplementedError


class MergeMethod:
    """How the diffs of one tensor combine into the delta added to the target."""

    name: str
    Params: type[BaseModel]
    statistics: tuple[type[Statistic], ...] = ()  # per tensor, over all its diffs
    takes_weights = True  # False: the method weighs the diffs itself (every weight must be 1)
    takes_transforms = True  # False: the diffs are merged as they are

    def default_transform(self, params: BaseModel) -> BaseModel | None:
        """The transform every diff gets unless it names its own (TIES trims by magnitude)."""
        return None

    def combine(self, out: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], params: BaseModel,
                chunk: Chunk) -> None:
        """out += merged delta (float chunks of one length; the deltas may be overwritten); `chunk.tally`
        collects per-tensor statistics; `chunk.scratch(name)` lends a chunk-sized buffer."""
        raise NotImplementedError
