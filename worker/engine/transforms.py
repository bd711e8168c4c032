"""The arithmetic: out = target + alpha * (finetuned - base), accumulated in float32 (float64 when an input
is float64) and rounded once to the stored dtype, plus the copies and the per-tensor statistics.

CPU work runs in cache-sized chunks over reusable scratch buffers: a whole-tensor expression would make
several passes over memory and allocate full-size float32 temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# float16 overflows to Inf on rounding above this; float32 and bfloat16 share float32's range.
_FINITE_LIMIT = {torch.float16: 65520.0}
CHUNK = 1 << 18  # elements per CPU pass: scratch stays in L2


@dataclass
class TensorStats:
    delta_sq: float = 0.0  # ||f - s||^2
    target_sq: float = 0.0  # ||t||^2
    bases_sq: float = 0.0  # ||t - s||^2, the distance between the bases
    cross: float = 0.0  # <t - s, f - s>
    nonfinite: bool = False

    def to_dict(self) -> dict:
        d, t, b = self.delta_sq ** 0.5, self.target_sq ** 0.5, self.bases_sq ** 0.5
        out = {"delta_norm": d, "target_norm": t, "delta_ratio": d / t if t else None}
        if d and b:
            out["bases_to_delta_ratio"] = b / d
            out["cos_bases_delta"] = self.cross / (b * d)
        return out


class Arithmetic:
    """Scratch buffers and the device the sums run on; one instance per graft, used by one thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, dtype: torch.dtype):
        bufs = self._scratch.get(dtype)
        if bufs is None:
            bufs = self._scratch[dtype] = tuple(torch.empty(CHUNK, dtype=dtype) for _ in range(3))
        return bufs

    def transfer(self, out: torch.Tensor, t: torch.Tensor, s: torch.Tensor, f: torch.Tensor, alpha: float,
                 compute: torch.dtype, stats: TensorStats) -> None:
        if self.device.type != "cpu":
            return self._transfer_device(out, t, s, f, alpha, compute, stats)
        a_buf, b_buf, c_buf = self._buffers(compute)
        n = out.numel()
        dsq = tsq = bsq = cross = osq = 0.0
        limit = _FINITE_LIMIT.get(out.dtype)
        big = 0.0
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            m = j - i
            a, b, c = a_buf[:m], b_buf[:m], c_buf[:m]
            c.copy_(s[i:j])
            a.copy_(f[i:j])
            a.sub_(c)  # the delta, exact in float32 for nearby bf16/f16 values
            b.copy_(t[i:j])
            c.sub_(b)  # base - target: the bases' distance, negated
            dsq += float(torch.dot(a, a))
            tsq += float(torch.dot(b, b))
            bsq += float(torch.dot(c, c))
            cross -= float(torch.dot(c, a))
            if alpha != 1.0:
                a.mul_(alpha)
            a.add_(b)
            # A NaN or Inf anywhere makes the sum of squares non-finite: one cheap pass instead of isfinite().
            osq += float(torch.dot(a, a))
            if limit is not None:
                big = max(big, float(a.abs().max()))
            out[i:j].copy_(a)  # the one rounding to the stored dtype
        stats.delta_sq += dsq
        stats.target_sq += tsq
        stats.bases_sq += bsq
        stats.cross += cross
        stats.nonfinite |= not math.isfinite(osq) or (limit is not None and big >= limit)

    def _transfer_device(self, out, t, s, f, alpha, compute, stats) -> None:
        dev = self.device
        td, sd, fd = (x.pin_memory().to(dev, non_blocking=True) for x in (t, s, f))
        delta = fd.to(compute) - sd.to(compute)
        tc = td.to(compute)
        bases = tc - sd.to(compute)
        stats.delta_sq += float(torch.dot(delta, delta))
        stats.target_sq += float(torch.dot(tc, tc))
        stats.bases_sq += float(torch.dot(bases, bases))
        stats.cross += float(torch.dot(bases, delta))
        result = (tc + delta * alpha if alpha != 1.0 else tc + delta).to(out.dtype)
        stats.nonfinite |= not bool(torch.isfinite(result).all())
        out.copy_(result.cpu())

    def copy(self, out: torch.Tensor, src: torch.Tensor, check_finite: bool, stats: TensorStats) -> None:
        if not check_finite:
            out.copy_(src)
            return
        a_buf = self._buffers(torch.float64 if src.dtype == torch.float64 else torch.float32)[0]
        n = out.numel()
        osq = 0.0
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            a = a_buf[:j - i]
            a.copy_(src[i:j])
            osq += float(torch.dot(a, a))
            out[i:j].copy_(a)
        limit = _FINITE_LIMIT.get(out.dtype)
        if not math.isfinite(osq) or (limit is not None and n and float(out.float().abs().max()) >= limit):
            stats.nonfinite = True
