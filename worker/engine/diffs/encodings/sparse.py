"""`sparse`: the k = ceil(density * n) largest |d| of a tensor (density read as the decimal it is written as:
0.7 of 10 elements is 7, not ceil(7.000000000000001)), each stored as its position and sign, decoded as
sign * c with one scale a tensor, c = mean |d| over the stored elements (for fixed signs the L2-best scale, as
in `sign`: sum s_i d_i / k). Everything else decodes as 0.

The threshold is exact: the k-th largest |d| by the radix select the magnitude transform uses
(worker/engine/methods/statistics/rank_select.py), which reads the tensor twice (high then low 16 bits of
|d|'s float32 pattern; a float64 delta is ranked by its float32 rounding), and a third pass writes the kept
elements. Ties at the threshold: exactly k are kept, the lowest indices first (RankWindow's tie counting, as
the magnitude transform keeps them). Kept elements whose delta is 0 (a k past the nonzeros) are not stored:
they decode to 0 either way, and leaving them out keeps c the mean of the magnitudes that carry information.

Parts: `entries` U16, the stored elements in index order, one each: frames of 2**15 elements, an entry is the
element's offset in its frame with the sign in bit 15 (1: negative); `counts` I64, the entries before each
frame (frames + 1 of them), so that a range decode reads its frames' entries only. Meta: `frame`, `scale`,
`stored` (entries)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from worker.engine.compute.patches import SparsePatch
from worker.engine.diffs.encoding_params import SparseParams
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import as_bytes, compute_name, f32, numel, read_tensor, relative
from worker.engine.errors import GraftError
from worker.engine.methods.base import RankWindow, magnitude_bits
from worker.engine.methods.statistics.rank_select import RankSelect

FRAME = 1 << 15  # offsets take 15 bits, the sign the 16th


def kept_count(density: float, n: int) -> int:
    return min(n, math.ceil(Fraction(str(density)) * n))


class _Kept:
    """Sums over the stored elements (and the largest |d| of the rest) for the scale and the errors."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_abs = self.sum_sq = 0.0
        self.max_abs, self.min_abs, self.max_dropped = 0.0, math.inf, 0.0

    def add(self, kept: torch.Tensor, dropped: torch.Tensor) -> None:
        mag = kept.abs().double()
        self.count += mag.numel()
        self.sum_abs += float(mag.sum())
        self.sum_sq += float(mag.dot(mag))
        if mag.numel():
            self.max_abs, self.min_abs = max(self.max_abs, float(mag.max())), min(self.min_abs, float(mag.min()))
        if dropped.numel():
            self.max_dropped = max(self.max_dropped, float(dropped.abs().max()))


class SparseEncoder:
    passes = 3  # two for the exact threshold, one to write what it keeps
    rows = 0

    def __init__(self, shape: tuple[int, ...], compute: torch.dtype, density: float, out: PartWriter) -> None:
        compute_name(compute)
        self.numel = numel(shape)
        self.k = kept_count(density, self.numel)
        self._window = RankWindow(0, self.k)
        self._select = RankSelect([self._window])
        self._out = out
        self._entries = None
        self._counts = torch.zeros(-(-self.numel // FRAME), dtype=torch.int64)
        self._kept = _Kept()
        self.norm2 = 0.0

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        delta = delta.reshape(-1)
        if pass_index == 0:
            self._select.add_coarse(magnitude_bits(delta))
            x = delta.double()
            self.norm2 += float(x.dot(x))
        elif pass_index == 1:
            self._select.add_fine(magnitude_bits(delta))
        else:
            self._write(start, delta)

    def _write(self, start: int, delta: torch.Tensor) -> None:
        if self._entries is None:
            self._entries = self._out.part("entries", "U16")
        keep = self._window.keep(magnitude_bits(delta)) & (delta != 0)
        self._kept.add(delta[keep], delta[~keep])
        at = keep.nonzero().reshape(-1)
        if not at.numel():
            return
        where = at + start
        entry = (where % FRAME) | ((delta[at] < 0).to(torch.int64) << 15)
        self._entries.write(as_bytes(torch.where(entry >= 32768, entry - 65536, entry).to(torch.int16)))  # U16
        first = start // FRAME
        frames = torch.bincount(where // FRAME - first)
        self._counts[first:first + frames.numel()] += frames

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self._select.finish_coarse()
        elif pass_index == 1:
            self._select.finish_fine()
            self._window.rewind()

    def finish(self) -> EncodedInfo:
        if self._entries is None:  # never fed (an empty tensor)
            self._out.part("entries", "U16")
        cumulative = torch.cat([torch.zeros(1, dtype=torch.int64), self._counts.cumsum(0)])
        self._out.part("counts", "I64").write(as_bytes(cumulative))
        kept = self._kept
        c = f32(kept.sum_abs / kept.count) if kept.count else 0.0
        # Stored elements err by ||d| - c|, the others by |d|.
        err2 = self.norm2 - 2 * c * kept.sum_abs + kept.count * c * c
        worst = max(kept.max_dropped, kept.max_abs - c, c - kept.min_abs) if kept.count else kept.max_dropped
        threshold = self._window.value_bits.get(self.k)
        extra = {"k": self.k, "stored": kept.count, "kept_fraction": kept.count / self.numel if self.numel else 0.0,
                 "scale": c, "threshold": _float32(threshold) if threshold is not None else None}
        return EncodedInfo(meta={"frame": FRAME, "scale": c, "stored": kept.count},
                           rel_frobenius=relative(err2, self.norm2), max_abs=worst, extra=extra)


def _float32(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


class Sparse:
    name = "sparse"
    Params = SparseParams

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        return True

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: SparseParams,
                out: PartWriter) -> SparseEncoder:
        return SparseEncoder(shape, compute, params.density, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        out.zero_()
        patch = self.patch(parts, meta, shape, start, out.numel(), out.dtype)
        out[patch.positions] = patch.values

    def patch(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int, count: int,
              dtype: torch.dtype) -> SparsePatch:
        """The stored elements of flat range [start, start + count): their positions in it (ascending) and
        values (+-c in `dtype`), for the kernel to patch onto the target (compute/patches.py)."""
        empty = SparsePatch(start, count, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=dtype))
        if count == 0:
            return empty
        frame, stop = meta["frame"], start + count
        first, last = start // frame, (stop - 1) // frame
        counts = read_tensor(parts, "counts", torch.int64, first, last - first + 2)
        steps = counts.diff()
        if int(counts[0]) < 0 or bool((steps < 0).any()):
            raise _malformed(parts, "its frame counts go backwards")
        entries = read_tensor(parts, "entries", torch.int16, int(counts[0]), int(counts[-1] - counts[0]))
        if not entries.numel():
            return empty
        # int16 entries: the offset is the low 15 bits, the sign bit is bit 15. Positions ascend (frames in
        # order, entries in index order in each), so only the first and last frames' cut ends are trimmed.
        base = (torch.arange(first, last + 1, dtype=torch.int64) * frame - start).repeat_interleave(steps)
        where = base.add_(entries & (frame - 1))
        # The patch and its trimming rely on that order: an artifact (a user's URI: its sha256 only says it is
        # what its own manifest lists) whose entries do not ascend is refused, never applied out of place.
        if where.numel() > 1 and not bool((where[1:] > where[:-1]).all()):
            raise _malformed(parts, "its entries are not in ascending order within a frame")
        lo, hi = torch.searchsorted(where, torch.tensor([0, count], dtype=torch.int64)).tolist()
        c = torch.tensor(meta["scale"], dtype=dtype)
        return SparsePatch(start, count, where[lo:hi], torch.where(entries[lo:hi] < 0, -c, c))


def _malformed(parts: PartReader, why: str) -> GraftError:
    return GraftError("invalid_diff", f"{getattr(parts, 'tensor', 'a sparse tensor')}: the sparse encoding is "
                      f"malformed: {why}")
