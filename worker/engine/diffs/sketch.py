"""A tensor's sketch: a seeded random projection (CountSketch: each element added, with a random sign, to one of
BUCKETS buckets) that is linear, so the sketch of t - s is the target's sketch minus the source base's, made
with the same seed. A diff artifact stores the source base's and the delta's; an inspection of a target
against the artifact sketches the target and estimates, without the source base,

    ||t - s||^2 ~ ||S t - S s||^2,   <t - s, d> ~ <S t - S s, S d>

Both estimators are unbiased; with pairwise-independent hashes their standard deviations are at most
sqrt(2 / BUCKETS) times ||t - s||^2 and ||t - s|| ||d|| respectively (Charikar et al. 2002; Thorup & Zhang
2012 for the inner product). A tensor of at most BUCKETS elements is stored whole (the sketch is the
identity): its figures are exact.

The hashes are ((a q + b) mod P)-style hashes of the element's block with a, b drawn from the tensor's name
(README: the format), so a sketch is reproduced from the name and the element index alone, by any reader."""

from __future__ import annotations

import functools
import hashlib
import math
import threading

import torch

BUCKETS = 1024
_P = (1 << 31) - 1  # a Mersenne prime: a * i stays below 2**62 for i < P
_Z = 4.0  # the stated bound: four standard deviations
_ROUNDING = 1e-12  # float64 sums of a tensor's elements in another order: far below this relative error


_scratch = threading.local()
ROWS_AT = 256  # blocks in one call from which they are summed by shift first (a BUCKETS x BUCKETS table)


@functools.cache
def _unroll() -> torch.Tensor:
    """[s, j]: the place r that lands in bucket j under shift s, (j - s) mod BUCKETS (8 MB, one for all)."""
    places = torch.arange(BUCKETS, dtype=torch.int64)
    return (places[None, :] - places[:, None]).bitwise_and_(BUCKETS - 1)


def _work(name: str, n: int) -> torch.Tensor:
    """A float64 buffer of this thread's, reused from call to call: fresh ones per piece (tens of megabytes)
    leave the allocator's arenas holding their high-water mark."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.numel() < n:
        buf = buffers[name] = torch.empty(n, dtype=torch.float64)
    return buf[:n]


def _coefficients(name: str) -> tuple[int, int, int, int]:
    digest = hashlib.sha256(b"graft-sketch/1\x00" + name.encode()).digest()
    a, b, c, e = (int.from_bytes(digest[k:k + 8], "little") % _P for k in range(0, 32, 8))
    return a or 1, b, c or 1, e


def width(numel: int) -> int:
    return numel if numel <= BUCKETS else BUCKETS


class Sketcher:
    """Adds chunks of one tensor (flat, element order, any cut) into its sketch, in float64.

    Element i = q * BUCKETS + r (its block q, its place r in the block) goes to bucket (r + shift(q)) mod BUCKETS
    with sign flip(q) * column(r): a block's elements never collide, elements of two blocks collide as two
    random shifts do (1 / BUCKETS), their signs are independent; shift and flip are hashes of q, column a fixed
    random sign per place. Hashing per block, not per element, keeps the sketch at a few operations an
    element."""

    def __init__(self, name: str, numel: int) -> None:
        self.numel = numel
        self.sketch = torch.zeros(width(numel), dtype=torch.float64)
        self._a, self._b, self._c, self._e = _coefficients(name)
        places = torch.arange(BUCKETS, dtype=torch.int64)
        self._column = self._signs(places, self._c ^ 0x5BD1E995, self._e)
        self._places = places

    @staticmethod
    def _signs(i: torch.Tensor, c: int, e: int) -> torch.Tensor:
        return ((i % _P) * (c % _P) + e).remainder_(_P).bitwise_and_(1).mul_(2).sub_(1).double()

    def _blocks(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.arange(first, first + count, dtype=torch.int64).remainder_(_P)
        shift = (q * self._a + self._b).remainder_(_P).bitwise_and_(BUCKETS - 1)
        return shift, self._signs(q, self._c, self._e)

    def add(self, start: int, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        x = _work("x", n).copy_(chunk.reshape(-1))  # worked on in place below
        if self.numel <= BUCKETS:
            self.sketch[start:start + n] += x
            return
        i = 0
        while i < n:  # a partial first or last block element by element, whole blocks at once
            offset = (start + i) % BUCKETS
            take = n - i if offset == 0 and n - i >= BUCKETS else min(n - i, BUCKETS - offset)
            if offset == 0 and take >= BUCKETS:
                take -= take % BUCKETS
            self._add_run(start + i, x[i:i + take])
            i += take

    def _add_run(self, start: int, x: torch.Tensor) -> None:
        """Elements [start, start + len(x)): whole blocks, or a part of one block."""
        q0, r0 = divmod(start, BUCKETS)
        if r0 == 0 and x.numel() % BUCKETS == 0:
            shift, flip = self._blocks(q0, x.numel() // BUCKETS)
            grid = x.view(-1, BUCKETS).mul_(self._column).mul_(flip[:, None])
            if len(shift) < ROWS_AT:  # few blocks: element by element is cheaper than the shift table
                index = (self._places[None, :] + shift[:, None]).bitwise_and_(BUCKETS - 1)
                self.sketch.index_add_(0, index.reshape(-1), grid.reshape(-1))
                return
            # Blocks of one shift summed first (whole rows: fast), then each shift's row rolled into the buckets.
            by_shift = _work("rows", BUCKETS * BUCKETS).view(BUCKETS, BUCKETS).zero_().index_add_(0, shift, grid)
            self.sketch += by_shift.gather(1, _unroll()).sum(0)
            return
        shift, flip = self._blocks(q0, 1)
        places = self._places[r0:r0 + x.numel()]
        index = (places + shift).bitwise_and_(BUCKETS - 1)
        self.sketch.index_add_(0, index, x * flip * self._column[places])


def estimates(target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, numel: int, delta_sq: float) -> dict:
    """||t - s||^2 and <t - s, d> from the three sketches (`delta_sq`: ||d||^2, exact, from the artifact), with
    the half-width of each one's stated bound (0 when the sketch is exact)."""
    diff = target - base
    bases_sq = float(torch.dot(diff, diff))
    cross = float(torch.dot(diff, delta))
    # The sketches' own float64 sums, added in other orders by the extraction and the inspection, differ by
    # rounding: a floor of that size keeps the bound honest when the bases are equal (t - s = 0).
    floor = _ROUNDING * float(torch.dot(base, base) + torch.dot(target, target))
    cross_floor = _ROUNDING * math.sqrt(float(torch.dot(base, base) + torch.dot(target, target))
                                        * float(torch.dot(delta, delta)))
    if numel <= BUCKETS:
        return {"bases_sq": bases_sq, "cross": cross, "bases_sq_bound": floor, "cross_bound": cross_floor}
    sigma = math.sqrt(2.0 / BUCKETS)
    delta_norm = math.sqrt(max(0.0, delta_sq))
    # The bounds are stated in terms of the true ||t - s||, estimated here: solve |x - est| <= z sigma x.
    bases_true_max = (bases_sq + floor) / max(1e-12, 1.0 - _Z * sigma)
    return {"bases_sq": bases_sq, "cross": cross, "bases_sq_bound": _Z * sigma * bases_true_max + floor,
            "cross_bound": _Z * sigma * math.sqrt(bases_true_max) * delta_norm + cross_floor}


def relative_bound() -> float:
    """The stated bound's half-width relative to ||t - s||^2 (four standard deviations)."""
    return _Z * math.sqrt(2.0 / BUCKETS)
