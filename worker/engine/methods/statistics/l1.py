"""mergekit's `rescale` (its rescaled_masked_tensor with the L1 norm): a diff's transformed delta times
||delta||_1 / ||transformed delta||_1, both over the whole tensor, left as it is when either norm is below
1e-7. One read, after the transform's own statistics (a magnitude window must be known to be applied).

The norms are summed in float64 and rounded to float32, and the factor divided in float32, as mergekit's
float32 run forms it (its sums are float32 reductions, so the factor may differ from mergekit's by an ulp
of float32)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engine.methods.base import Chunk, Statistic, f32

if TYPE_CHECKING:
    import torch

EPS = f32(1e-7)  # mergekit's: a norm below it is not rescaled


class L1Rescale(Statistic):
    def __init__(self, site, earlier, method, params) -> None:
        super().__init__(site, earlier)
        self.method, self.params, self.earlier = method, params, earlier
        self.l1_before = self.l1_after = 0.0
        self.factor = 1.0

    @classmethod
    def create(cls, method, params, site, earlier):
        return cls(site, earlier, method, params) if method.l1_rescale(params) else None

    def add(self, read, deltas, start, scratch) -> None:
        import torch

        delta = deltas[self.site.diff]
        self.l1_before += float(delta.abs().sum(dtype=torch.float64))
        masked = scratch("l1").copy_(delta)
        self.method.apply(masked, self.params, Chunk(start, scratch, self.site.row, self.site.key, self.earlier))
        self.l1_after += float(masked.abs().sum(dtype=torch.float64))

    def finish(self, read) -> None:
        before, after = f32(self.l1_before), f32(self.l1_after)
        self.factor = 1.0 if before < EPS or after < EPS else f32(before / after)

    def adjust(self, delta: torch.Tensor) -> None:
        if self.factor != 1.0:
            delta.mul_(self.factor)
