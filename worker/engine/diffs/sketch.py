"""A tensor's sketch: a seeded random projection (CountSketch: each element added, with a random sign, to one of
BUCKETS buckets) that is linear, so the sketch of t - s is the target's sketch minus the source base's, made
with the same seed. A diff artifact stores the source base's and the delta's; an inspection of a target
against the artifact sketches the target and estimates, without the source base,

    ||t - s||^2 ~ ||S t - S s||^2,   <t - s, d> ~ <S t - S s, S d>

Both estimators are unbiased; with pairwise-independent hashes their standard deviations are at most
sqrt(2 / BUCKETS) times ||t - s||^2 and ||t - s|| ||d|| respectively (Charikar et al. 2002; Thorup & Zhang
2012 for the inner product). A tensor of at most BUCKETS elements is stored whole (the sketch is the
identity): its figures are exact.

The hashes are ((a i + b) mod P) with a, b drawn from the tensor's name, so a sketch is reproduced from the
name and the element index alone, by any reader."""

from __future__ import annotations

import hashlib
import math

import torch

BUCKETS = 1024
_P = (1 << 31) - 1  # a Mersenne prime: a * i stays below 2**62 for i < P
_Z = 4.0  # the stated bound: four standard deviations
_ROUNDING = 1e-12  # float64 sums of a tensor's elements in another order: far below this relative error


def _coefficients(name: str) -> tuple[int, int, int, int]:
    digest = hashlib.sha256(b"graft-sketch/1\x00" + name.encode()).digest()
    a, b, c, e = (int.from_bytes(digest[k:k + 8], "little") % _P for k in range(0, 32, 8))
    return a or 1, b, c or 1, e


def width(numel: int) -> int:
    return numel if numel <= BUCKETS else BUCKETS


class Sketcher:
    """Adds chunks of one tensor (flat, element order, any cut) into its sketch, in float64."""

    def __init__(self, name: str, numel: int) -> None:
        self.numel = numel
        self.sketch = torch.zeros(width(numel), dtype=torch.float64)
        self._a, self._b, self._c, self._e = _coefficients(name)

    def _hash(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(start, start + count, dtype=torch.int64).remainder_(_P)
        bucket = (i * self._a + self._b).remainder_(_P).remainder_(BUCKETS)
        sign = (i * self._c + self._e).remainder_(_P).bitwise_and_(1).mul_(2).sub_(1)
        return bucket, sign

    def add(self, start: int, chunk: torch.Tensor) -> None:
        if self.numel <= BUCKETS:
            self.sketch[start:start + chunk.numel()] += chunk.double()
            return
        bucket, sign = self._hash(start, chunk.numel())
        self.sketch.index_add_(0, bucket, chunk.double() * sign)


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
