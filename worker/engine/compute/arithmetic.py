"""The plain kernel: out = target + alpha * (finetuned - base), accumulated in float32 (float64 when an input
is float64) and rounded once to the stored dtype, plus the copies and the per-tensor sums (tensor_stats.py).

CPU work runs in cache-sized chunks over reusable scratch buffers: a whole-tensor expression would make
several passes over memory and allocate full-size float32 temporaries.
"""

from __future__ import annotations

import math

import torch

from worker.engine.compute.patches import Patch, RowsPatch, SparsePatch, StoredPatch, rows_needed
from worker.engine.compute.tensor_stats import TensorStats, chunk_sums, delta_sums

# float16 overflows to Inf on rounding above this; float32 and bfloat16 share float32's range.
_FINITE_LIMIT = {torch.float16: 65520.0}
CHUNK = 1 << 18  # elements per CPU pass: scratch stays in L2 (a power of 2: _apply_sparse masks by it)


def _finite(chunk: torch.Tensor) -> bool:
    """No NaN or Inf in a float chunk. A NaN or Inf makes the sum of squares non-finite, and one dot is far
    cheaper than isfinite(); huge finite values (|x| > 1.8e19, e.g. float masks near finfo.min) overflow
    the dot too, so a non-finite dot is confirmed element-wise before anything is reported."""
    return math.isfinite(float(torch.dot(chunk, chunk))) or bool(torch.isfinite(chunk).all())


_SIGNED = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _has_negative_zero(x: torch.Tensor) -> bool:
    """Whether a float chunk holds -0.0: its bit pattern (sign bit alone) is the smallest signed integer, so
    one integer min finds it."""
    kind = _SIGNED[x.element_size()]
    return x.numel() > 0 and int(x.view(kind).min()) == torch.iinfo(kind).min


def _scaled_sum(out: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, alpha: float, finite: bool,
                big: float, limit: float | None) -> tuple[bool, float]:
    """out = target + alpha * delta for one chunk, in place in `delta`, rounded once into `out`; the running
    finiteness and, for float16, the largest magnitude."""
    if alpha != 1.0:
        delta.mul_(alpha)
    delta.add_(target)
    if finite:
        finite = _finite(delta)
    if limit is not None:
        big = max(big, float(delta.abs().max()))
    out.copy_(delta)  # the one rounding to the stored dtype
    return finite, big


class Arithmetic:
    """Scratch buffers and the device the sums run on; one instance per graft, used by one thread."""

    def __init__(self, device: torch.device, *, whole_pieces: bool | None = None) -> None:
        self.device = device
        # Accelerators take whole pieces; the CPU walks cache-sized chunks. Tests force the former on CPU.
        self.whole_pieces = device.type != "cpu" if whole_pieces is None else whole_pieces
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None  # a low-rank patch's covering rows, one chunk's

    def _buffers(self, dtype: torch.dtype):
        bufs = self._scratch.get(dtype)
        if bufs is None:
            bufs = self._scratch[dtype] = tuple(torch.empty(CHUNK, dtype=dtype) for _ in range(3))
        return bufs

    def transfer(self, out: torch.Tensor, t: torch.Tensor, s: torch.Tensor, f: torch.Tensor, alpha: float,
                 compute: torch.dtype, stats: TensorStats) -> None:
        if self.whole_pieces:
            return self._transfer_device(out, t, s, f, alpha, compute, stats)
        a_buf, b_buf, c_buf = self._buffers(compute)
        n = out.numel()
        sums = TensorStats()  # this piece's, added to the tensor's at the end
        finite = True
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
            sums.add_chunk(chunk_sums(b, a, c))
            finite, big = _scaled_sum(out[i:j], a, b, alpha, finite, big, limit)
        stats.add(sums)
        stats.nonfinite |= not finite or (limit is not None and big >= limit)

    def apply_delta(self, out: torch.Tensor, t: torch.Tensor, d: torch.Tensor, alpha: float,
                    compute: torch.dtype, stats: TensorStats) -> None:
        """transfer() from a delta formed beforehand (a diff artifact's, in the compute dtype): the same
        operations from the delta on, so an exact artifact writes the bytes the pair writes."""
        if self.whole_pieces:
            return self._apply_delta_device(out, t, d, alpha, compute, stats)
        a_buf = self._buffers(compute)[0]
        if d.dtype == compute:  # the decoded delta is this piece's own read buffer: worked on where it is
            return self._delta_chunks(out, t, lambda i, j: d[i:j], alpha, compute, stats)
        return self._delta_chunks(out, t, lambda i, j: a_buf[:j - i].copy_(d[i:j]), alpha, compute, stats)

    def _delta_chunks(self, out: torch.Tensor, t: torch.Tensor, form, alpha: float, compute: torch.dtype,
                      stats: TensorStats) -> None:
        """apply_delta's chunks, each chunk's delta from form(i, j) (a tensor the chunk may overwrite)."""
        b_buf = self._buffers(compute)[1]
        n = out.numel()
        sums = TensorStats()
        finite, big = True, 0.0
        limit = _FINITE_LIMIT.get(out.dtype)
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            a, b = form(i, j), b_buf[:j - i]
            b.copy_(t[i:j])
            sums.add_chunk(delta_sums(b, a))
            finite, big = _scaled_sum(out[i:j], a, b, alpha, finite, big, limit)
        stats.add(sums)
        stats.nonfinite |= not finite or (limit is not None and big >= limit)

    def apply_patch(self, out: torch.Tensor, t: torch.Tensor, patch: Patch, alpha: float, compute: torch.dtype,
                    stats: TensorStats) -> None:
        """apply_delta() of a delta kept in its encoding's structure (patches.py), with the bytes apply_delta
        writes from the dense delta: a sparse delta touches only its kept elements, a low-rank one forms U V
        chunk by chunk here, a stored bfloat16 one is widened as it is read. The manifest's sums may differ
        from the dense delta's in their last bits (the dots add the same terms in another order)."""
        if self.whole_pieces or not math.isfinite(alpha):
            dense = torch.empty(out.numel(), dtype=compute)
            patch.dense_into(0, dense)
            return self.apply_delta(out, t, dense, alpha, compute, stats)
        if isinstance(patch, StoredPatch):
            return self.apply_delta(out, t, patch.values, alpha, compute, stats)
        if isinstance(patch, RowsPatch):
            need = rows_needed(patch, CHUNK)
            if self._rows is None or self._rows.dtype != compute or self._rows.numel() < need:
                self._rows = torch.empty(need, dtype=compute)
            return self._delta_chunks(out, t, lambda i, j: patch.product(i, j, compute, self._rows), alpha,
                                      compute, stats)
        return self._apply_sparse(out, t, patch, alpha, compute, stats)

    def _apply_sparse(self, out: torch.Tensor, t: torch.Tensor, patch: SparsePatch, alpha: float,
                      compute: torch.dtype, stats: TensorStats) -> None:
        """What the dense kernel makes of a zero delta is the target itself, rounded from the compute dtype
        (exact), but for a target's -0.0, which becomes +0.0 unless alpha is negative: each chunk's target is
        copied as it is, then its kept elements formed as the dense kernel forms them, the chunk in cache
        throughout (one read of the target, one write of the output). A chunk with a non-finite target (NaN
        payloads, infinities) or a -0.0 that would change takes the dense kernel: its bytes whatever they are."""
        a_buf, b_buf, _c = self._buffers(compute)
        n = out.numel()
        cuts = patch.bounds(torch.tensor([*range(0, n, CHUNK), n], dtype=torch.int64))
        local = patch.positions & (CHUNK - 1)  # each kept element's place in its chunk (CHUNK: a power of 2)
        sums = TensorStats()
        finite, big = True, 0.0
        limit = _FINITE_LIMIT.get(out.dtype)
        plus_zero = math.copysign(1.0, alpha) > 0  # alpha x +0.0 is +0.0, and -0.0 + +0.0 is +0.0
        for c, i in enumerate(range(0, n, CHUNK)):
            j = min(n, i + CHUNK)
            tc, oc = t[i:j], out[i:j]
            b = b_buf[:j - i].copy_(tc)
            t_sq = torch.dot(b, b)
            if not math.isfinite(float(t_sq)) or (plus_zero and _has_negative_zero(tc)):
                a = a_buf[:j - i]
                patch.dense_into(i, a)
                sums.add_chunk(delta_sums(b, a))
                finite, big = _scaled_sum(oc, a, b, alpha, finite, big, limit)
                continue
            at, v = local[cuts[c]:cuts[c + 1]], patch.values[cuts[c]:cuts[c + 1]]
            kept = v.mul(alpha) if alpha != 1.0 else v.clone()
            kept.add_(b.index_select(0, at))
            oc.copy_(tc)  # the target's values are their own rounding
            oc.index_copy_(0, at, kept.to(out.dtype))
            sums.add_chunk((torch.dot(v, v), t_sq, 0.0, 0.0))
            finite = finite and _finite(kept)
            if limit is not None:
                big = max(big, float(b.abs().max()), float(kept.abs().max()) if kept.numel() else 0.0)
        stats.add(sums)
        stats.nonfinite |= not finite or (limit is not None and big >= limit)

    def _apply_delta_device(self, out, t, d, alpha, compute, stats) -> None:
        dev = self.device
        td, dd = (self._staging(slot, x).copy_(x).to(dev, non_blocking=True) for slot, x in enumerate((t, d)))
        tc, delta = td.to(compute), dd.to(compute)
        dots = torch.stack([torch.dot(delta, delta), torch.dot(tc, tc)])
        result = tc.add_(delta, alpha=alpha) if alpha != 1.0 else tc.add_(delta)
        self._finish_device(out, result, dots, stats)

    def _finish_device(self, out, result, dots, stats) -> None:
        """The piece's rounding, copy back and checks, shared by the device kernels."""
        limit = _FINITE_LIMIT.get(out.dtype)
        big = result.abs().max() if limit is not None and result.numel() else None
        host_out = self._staging(3, out)
        host_out.copy_(result.to(out.dtype), non_blocking=True)
        values = torch.cat([dots.double(), torch.dot(result, result).double().reshape(1)]).tolist()
        *sums, o = values  # synchronises: host_out is complete after this
        stats.add_chunk(sums if len(sums) == 4 else (*sums, 0.0, 0.0))
        finite = math.isfinite(o) or bool(torch.isfinite(result).all())
        stats.nonfinite |= not finite or (big is not None and float(big) >= limit)
        out.copy_(host_out)

    def _staging(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A reused host buffer shaped like `like`: page-locked on CUDA so copies run asynchronously."""
        nbytes = like.numel() * like.element_size()
        buf = self._host.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._host[slot] = buf
        return buf[:nbytes].view(like.dtype)

    def _transfer_device(self, out, t, s, f, alpha, compute, stats) -> None:
        """The whole piece at once on the accelerator: its memory is bounded by the block size."""
        dev = self.device
        on_device = []
        for slot, x in enumerate((t, s, f)):
            host = self._staging(slot, x)
            host.copy_(x)
            on_device.append(host.to(dev, non_blocking=True))
        td, sd, fd = on_device
        tc = td.to(compute)
        delta = fd.to(compute) - sd.to(compute)
        sums = torch.stack(chunk_sums(tc, delta, sd.to(compute) - tc))
        result = tc.add_(delta, alpha=alpha) if alpha != 1.0 else tc.add_(delta)
        self._finish_device(out, result, sums, stats)

    def copy(self, out: torch.Tensor, src: torch.Tensor, check_finite: bool, stats: TensorStats) -> None:
        if not check_finite:
            out.copy_(src)
            return
        a_buf = self._buffers(torch.float64 if src.dtype == torch.float64 else torch.float32)[0]
        n = out.numel()
        finite = True
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            a = a_buf[:j - i]
            a.copy_(src[i:j])
            if finite:
                finite = _finite(a)
            out[i:j].copy_(a)
        limit = _FINITE_LIMIT.get(out.dtype)
        if not finite or (limit is not None and n and float(out.float().abs().max()) >= limit):
            stats.nonfinite = True
