"""A recipe's arithmetic for one merged piece: out = target + merge(transform_i(f_i - s_i), w_i), in float32
(float64 when an input is float64) and rounded once; the tensor's sums (tensor_stats.py) from its first diff.
CPU work walks cache-sized chunks (whole rows where a method ranks rows); an accelerator takes the piece at
once (the tests force that on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.compute.arithmetic import _FINITE_LIMIT, CHUNK, _finite
from worker.engine.compute.tensor_stats import TensorStats, chunk_sums, delta_sums
from worker.engine.methods import TRANSFORMS
from worker.engine.methods.base import Chunk
from worker.engine.planning.recipe_plan import DiffUse, MergeContext


class Scratch:
    """Reused chunk buffers of one compute thread: fresh megabyte tensors per chunk cost page faults."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(max(n, CHUNK), dtype=dtype, device=device)
        return buf[:n]

    def lender(self, n: int, dtype: torch.dtype, device: torch.device):
        """scratch(name): a buffer of n elements of `dtype` on `device`."""
        return lambda name: self.get(name, n, dtype, device)


def chunk_step(row: int) -> int:
    """Elements per CPU chunk: CHUNK, or whole rows of `row` elements (at least one) when a method needs them."""
    return CHUNK if row <= 1 else max(row, CHUNK - CHUNK % row)


@dataclass
class MergePiece:
    """One merged piece of a tensor: the output and target views, each diff's (base, fine-tune) views, where
    the piece starts in the tensor, the compute dtype and the tensor's sums."""

    name: str
    out: torch.Tensor
    target: torch.Tensor
    pairs: list[tuple[torch.Tensor | None, torch.Tensor]]  # (None, delta): a diff artifact
    start: int
    compute: torch.dtype
    stats: TensorStats


class MergeKernel:
    """The merge arithmetic of one graft (one compute thread): scratch, the device, chunked or whole."""

    def __init__(self, merge: MergeContext, device: torch.device, whole: bool) -> None:
        self.merge, self.device, self.whole = merge, device, whole
        self.scratch = Scratch()

    def piece(self, p: MergePiece) -> None:
        n = p.out.numel()
        step = n if self.whole else chunk_step(self.merge.rows.get(p.name, 0))
        limit = _FINITE_LIMIT.get(p.out.dtype)
        for i in range(0, n, step):
            j = min(n, i + step)
            acc = self._merged(p, i, j)
            finite = _finite(acc)
            big = float(acc.abs().max()) if limit is not None and j > i else 0.0
            p.stats.nonfinite |= not finite or (limit is not None and big >= limit)
            p.out[i:j].copy_(acc.to(p.out.dtype).cpu() if acc.device != p.out.device else acc)

    def _merged(self, p: MergePiece, i: int, j: int) -> torch.Tensor:
        """target + the merged delta over elements [i, j) of the piece, in the compute dtype."""
        m, uses = j - i, self.merge.uses[p.name]
        lend = self.scratch.lender(m, p.compute, self.device)
        acc = lend("acc").copy_(p.target[i:j])
        bases: dict[int, torch.Tensor] = {}  # diffs of one base share its conversion
        deltas = []
        for k, ((s, f), use) in enumerate(zip(p.pairs, uses, strict=True)):
            delta = lend(f"delta{k}").copy_(f[i:j])
            if s is not None:  # a pair; a diff artifact gives its delta (s is None)
                base = bases.get(s.data_ptr())
                if base is None:
                    base = bases[s.data_ptr()] = lend(f"base{len(bases)}").copy_(s[i:j])
                delta.sub_(base)
            if k == 0:  # the manifest's proxies, from the first diff
                p.stats.add_chunk(chunk_sums(acc, delta, torch.sub(base, acc, out=lend("tmp"))) if s is not None
                                  else delta_sums(acc, delta))
            self._transform(delta, use, Chunk(p.start + i, lend, self.merge.rows.get(p.name, 1), use.key,
                                              use.stats))
            deltas.append(delta)
        row = self.merge.rows.get(p.name, 1)
        self.merge.method.combine(acc, deltas, [u.weight for u in uses], self.merge.params,
                                  Chunk(p.start + i, lend, row, 0, self.merge.tensor_stats.get(p.name, {}),
                                        self.merge.tallies.setdefault(p.name, {})))
        return acc

    @staticmethod
    def _transform(delta: torch.Tensor, use: DiffUse, chunk: Chunk) -> None:
        use.seen += delta.numel()
        kept = None
        if use.transform is not None:
            kept = TRANSFORMS[use.transform.method].apply(delta, use.transform, chunk)
            for stat in use.stats.values():
                stat.adjust(delta)
        use.kept += delta.numel() if kept is None else kept  # a window's count comes from its width
