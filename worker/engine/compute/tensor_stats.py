"""The four sums every pass that reads a diff keeps per tensor (the graft's manifest, its connectivity
proxies, the inspection's weights level), formed one way for all of them:

    delta_sq = ||f - s||^2, target_sq = ||t||^2, bases_sq = ||t - s||^2, cross = <t - s, f - s>

each chunk's dots in the compute dtype (float32, or float64), summed in Python floats."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

RATIOS = ("bases_distance_ratio", "delta_ratio", "bases_to_delta_ratio", "cos_bases_delta")


def chunk_sums(target: torch.Tensor, delta: torch.Tensor, base_minus_target: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's dots: ||delta||^2, ||t||^2, ||s - t||^2 and <s - t, delta> (the cross term, negated: the
    kernels hold s - t, which they form in place of s)."""
    c = base_minus_target
    return torch.dot(delta, delta), torch.dot(target, target), torch.dot(c, c), torch.dot(c, delta)


def delta_sums(target: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """chunk_sums of a diff artifact's delta, whose base is not at hand: the bases' terms stay zero (the
    artifact's sketch estimates them: graft inspect --diff)."""
    return torch.dot(delta, delta), torch.dot(target, target), 0.0, 0.0


@dataclass
class TensorStats:
    delta_sq: float = 0.0  # ||f - s||^2
    target_sq: float = 0.0  # ||t||^2
    bases_sq: float = 0.0  # ||t - s||^2, the distance between the bases
    cross: float = 0.0  # <t - s, f - s>
    nonfinite: bool = False  # NaN or Inf in the output (a graft's)
    elements: int = 0  # elements summed (the inspection counts them)
    # A diff artifact's: the stated bounds of the sketched sums (None: not estimable); absent for a pair.
    sketch: dict | None = field(default_factory=dict)

    def add_chunk(self, sums, elements: int = 0) -> None:
        """Add chunk_sums' four dots."""
        d, t, b, negated_cross = sums
        self.delta_sq += float(d)
        self.target_sq += float(t)
        self.bases_sq += float(b)
        self.cross -= float(negated_cross)
        self.elements += elements

    def add(self, other: TensorStats) -> None:
        self.delta_sq += other.delta_sq
        self.target_sq += other.target_sq
        self.bases_sq += other.bases_sq
        self.cross += other.cross
        self.elements += other.elements
        self.nonfinite |= other.nonfinite

    def _bounds(self, t: float, d: float, b: float) -> dict:
        """The sketched figures' stated intervals (worker/engine/diffs/sketch.py: four standard deviations)."""
        lo_sq, hi_sq = _bound_ratio(self.bases_sq, self.sketch["bases_sq_bound"])
        out = {"bases_norm": [math.sqrt(lo_sq), math.sqrt(hi_sq)]}
        if t:
            out["bases_distance_ratio"] = [math.sqrt(lo_sq) / t, math.sqrt(hi_sq) / t]
        if d and b:
            half = self.sketch["cross_bound"]
            out["cross"] = [self.cross - half, self.cross + half]
        return out

    @property
    def finite(self) -> bool:
        """The sums are finite (a NaN or Inf input, or squares past float range, make them not)."""
        return all(math.isfinite(x) for x in (self.target_sq, self.delta_sq, self.bases_sq, self.cross))

    def to_dict(self) -> dict:
        """The manifest's entry."""
        d, t, b = self.delta_sq ** 0.5, self.target_sq ** 0.5, self.bases_sq ** 0.5
        out = {"delta_norm": d, "target_norm": t, "delta_ratio": d / t if t else None}
        if d and b:
            out["bases_to_delta_ratio"] = b / d
            out["cos_bases_delta"] = self.cross / (b * d)
        return out

    def report(self) -> dict:
        """The inspection's entry: norms and the four ratios; a ratio whose denominator is zero (or any
        non-finite sum) is None."""
        if not self.finite:
            return {"elements": self.elements, "nonfinite": True, **dict.fromkeys(
                ("target_norm", "delta_norm", "bases_norm", *RATIOS))}
        t, d, b = math.sqrt(self.target_sq), math.sqrt(self.delta_sq), math.sqrt(self.bases_sq)
        if self.sketch is None:  # a diff artifact's tensor its sketch does not cover: no bases' figures
            return {"elements": self.elements, "target_norm": t, "delta_norm": d, "estimated": None,
                    **dict.fromkeys(("bases_norm", "bases_distance_ratio", "bases_to_delta_ratio",
                                     "cos_bases_delta")), "delta_ratio": d / t if t else None}
        estimated = {"estimated": self._bounds(t, d, b)} if self.sketch else {}
        return {**estimated, "elements": self.elements, "target_norm": t, "delta_norm": d, "bases_norm": b,
                "bases_distance_ratio": b / t if t else None, "delta_ratio": d / t if t else None,
                "bases_to_delta_ratio": b / d if d else None,
                "cos_bases_delta": self.cross / (b * d) if b and d else None}


def _bound_ratio(value: float, half: float) -> list[float]:
    return [max(0.0, value - half), value + half]


def connectivity_medians(rows: list[tuple[tuple[int, ...], TensorStats]]) -> dict:
    """Whole-model connectivity proxies from per-tensor sums ((shape, sums) of each tensor that took the diff):
    medians of the per-matrix ratios over the tensors of two or more dimensions whose target and delta are
    non-zero and finite, because a norm pooled over the model is dominated by whichever tensors carry the most
    mass (in small models, the norms'). A ratio no tensor has is None; `tensors` counts those used."""
    kept = [s.report() for shape, s in rows if len(shape) >= 2 and s.finite and s.target_sq and s.delta_sq]
    out: dict = {}
    for name in RATIOS:
        values = [r[name] for r in kept if r[name] is not None]
        out[name] = statistics.median(values) if values else None
    out["tensors"] = len(kept)
    return out
