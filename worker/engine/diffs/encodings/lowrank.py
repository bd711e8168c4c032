"""`lowrank`: a truncated SVD of the delta seen as a matrix A (m = shape[0] rows x n = the rest), by the
randomized range finder of Halko, Martinsson and Tropp (2011, algorithms 4.4 and 5.1), streamed over the rows:

  pass 0            Y = A Omega        (Omega n x l Gaussian from `seed`, l = r + 8 oversampling; ||A||^2 too)
  2 per iteration   Z = A^T Q, Y = A Z (power iterations, re-orthonormalised each time: Q = qr(Y), qr(Z))
  next              B = Q^T A          (l x n); B = U_b S V^T, U = Q U_b[:, :r] S[:r], V = V^T[:r]
  last              max |A - U V| (and ||A - U V|| measured, not estimated) over row blocks rebuilt

so 3 + 2 * power_iterations passes, holding Y/Q (m x l), Omega/Z and B (n x l each). The rows are cut into
blocks of a fixed count (2**18 elements' worth) whatever the caller's chunks: the sums over blocks then add the
same products in the same order, and any chunking gives the same bits.

`rank` r, or `energy` e: the smallest r whose retained share sum_{i<=r} s_i^2 / ||A||^2 reaches e, s from B,
||A||^2 from pass 0 (||A - U V||^2 = ||A||^2 - sum_{i<=r} s_i^2, Q being orthonormal). With `energy` the
sketch is as wide as the largest rank that saves bytes (below), at most 4096: that is its memory; the share
reported may fall short of e where that rank does not reach it. A zero matrix has rank 0.

A rank r saves bytes when U and V (float32, r (m + n) elements) take less than the fine-tune's bf16 tensor
(m n / 2 float32s' worth): otherwise, and for 1-D or empty tensors, the tensor is stored exact (meta and
extra say `stored: exact`, and decode_into hands it to exact).

Parts: `U` F32 [m, r] (singular values folded in), `V` F32 [r, n]. Meta: `rank`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from worker.engine.compute.patches import RowsPatch
from worker.engine.diffs.encoding_params import MAX_RANK, LowRankParams
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import ErrorTally, as_bytes, compute_name, matrix, numel, read_tensor
from worker.engine.diffs.encodings.exact import EXACT, ExactEncoder, fallback_encoder, stored_exact

OVERSAMPLING = 8
BLOCK = 1 << 18  # elements in a row block (at least one row)


def saving_rank(m: int, n: int) -> int:
    """The largest r with r (m + n) < m n / 2 (0: none saves)."""
    return (m * n - 1) // (2 * (m + n)) if m and n else 0


def target_rank(shape: tuple[int, ...], params: LowRankParams) -> int | None:
    """The rank (or, for `energy`, the most it may be) a tensor is encoded at; None: stored exact."""
    if len(shape) < 2 or not numel(shape):
        return None
    cap = saving_rank(*matrix(shape))
    if params.energy is not None:
        return min(cap, MAX_RANK) or None
    return params.rank if params.rank <= cap else None


def orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


class RowBlocks:
    """The flat elements fed, re-cut into blocks of a fixed number of whole rows (the last block may hold
    fewer). A block is a view of one buffer: used before the next is asked for."""

    def __init__(self, m: int, n: int, dtype: torch.dtype) -> None:
        self.n = n
        self.buffer = torch.empty(min(max(1, BLOCK // n), m) * n, dtype=dtype)
        self.fill = 0
        self.row = 0

    def feed(self, delta: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        i, size = 0, self.buffer.numel()
        while i < delta.numel():
            take = min(size - self.fill, delta.numel() - i)
            self.buffer[self.fill:self.fill + take].copy_(delta[i:i + take])
            self.fill, i = self.fill + take, i + take
            if self.fill == size:
                yield self._block()

    def end(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The last, partial block of a pass; then the next pass starts at row 0."""
        if self.fill:
            yield self._block()
        self.row = 0

    def _block(self) -> tuple[int, torch.Tensor]:
        rows = self.fill // self.n
        block = (self.row, self.buffer[:rows * self.n].view(rows, self.n))
        self.row, self.fill = self.row + rows, 0
        return block


class LowRankEncoder:
    rows = 0  # any cut: the rows are re-blocked

    def __init__(self, shape: tuple[int, ...], compute: torch.dtype, params: LowRankParams, target: int,
                 out: PartWriter, *, device: torch.device | str = "cpu") -> None:
        compute_name(compute)
        # The sketches and products live on `device`; the rows arrive on the CPU and are moved block by block.
        # Omega is drawn on the CPU from `seed` whatever the device, so a GPU run sketches the same subspace.
        self.device = torch.device(device)
        self.m, self.n = matrix(shape)
        self.dtype, self.energy, self.target = compute, params.energy, target
        self.width = min(target + OVERSAMPLING, self.m, self.n)
        self.iterations = params.power_iterations
        self.passes = 3 + 2 * self.iterations
        self._out, self.seed = out, params.seed
        self._right: torch.Tensor | None = None  # Omega, then Z; made on the first pass (not for a probe)
        self._basis: torch.Tensor | None = None  # Y, then Q
        self._b: torch.Tensor | None = None
        self._u = self._v = torch.empty(0)
        self._blocks = RowBlocks(self.m, self.n, compute)
        self._tally = ErrorTally()
        self.norm2 = 0.0
        self.rank, self.retained = 0, 1.0

    def _stage(self, pass_index: int) -> str:
        if pass_index <= 2 * self.iterations:
            return "range" if pass_index % 2 == 0 else "adjoint"
        return "project" if pass_index == 2 * self.iterations + 1 else "error"

    def _sketch(self) -> None:
        if self._basis is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._right = torch.randn(self.n, self.width, generator=generator, dtype=self.dtype).to(self.device)
            self._basis = torch.empty(self.m, self.width, dtype=self.dtype, device=self.device)

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        delta = delta.reshape(-1)
        if pass_index == 0:
            self._sketch()
            x = delta.double()
            self.norm2 += float(x.dot(x))
        stage = self._stage(pass_index)
        for row, block in self._blocks.feed(delta):
            self._apply(stage, row, block)

    def _apply(self, stage: str, row: int, block: torch.Tensor) -> None:
        rows = slice(row, row + block.shape[0])
        block = block.to(self.device)
        if stage == "range":  # Y = A Omega, or A Z
            torch.mm(block, self._right, out=self._basis[rows])
        elif stage == "adjoint":  # Z = A^T Q
            self._right.addmm_(block.T, self._basis[rows])
        elif stage == "project":  # B = Q^T A
            self._b.addmm_(self._basis[rows].T, block)
        else:  # as decode_into rebuilds it
            self._tally.add(block, self._u[rows].to(self.dtype) @ self._v.to(self.dtype))

    def end_pass(self, pass_index: int) -> None:
        stage = self._stage(pass_index)
        self._sketch()
        for row, block in self._blocks.end():
            self._apply(stage, row, block)
        if stage == "range":
            self._basis = orthonormal(self._basis)
            if pass_index < 2 * self.iterations:
                self._right = torch.zeros(self.n, self.width, dtype=self.dtype, device=self.device)
            else:
                self._right, self._b = None, torch.zeros(self.width, self.n, dtype=self.dtype, device=self.device)
        elif stage == "adjoint":
            self._right = orthonormal(self._right)
        elif stage == "project":
            self._decompose()

    def _decompose(self) -> None:
        u_b, s, vh = torch.linalg.svd(self._b, full_matrices=False)
        kept = (s.double() ** 2).cumsum(0)
        if self.energy is None:
            self.rank = min(self.target, self.width)
        elif self.norm2 > 0:
            goal = torch.tensor([self.energy * self.norm2], dtype=torch.float64, device=kept.device)
            reach = int(torch.searchsorted(kept, goal)[0]) + 1  # the first r whose share reaches it
            self.rank = min(reach, self.target, self.width)
        if self.norm2 > 0:
            self.retained = float(kept[self.rank - 1]) / self.norm2 if self.rank else 0.0
        r = self.rank
        self._u = (self._basis @ (u_b[:, :r] * s[:r])).float()
        self._v = vh[:r].float().contiguous()
        self._basis = self._b = None

    def finish(self) -> EncodedInfo:
        self._out.part("U", "F32").write(as_bytes(self._u.cpu()))
        self._out.part("V", "F32").write(as_bytes(self._v.cpu()))
        extra = {"rank": self.rank, "retained_energy": self.retained, "sketch": self.width,
                 "power_iterations": self.iterations}
        if self.energy is not None:
            extra["energy"] = self.energy
        return EncodedInfo(meta={"rank": self.rank}, rel_frobenius=self._tally.rel_frobenius,
                           max_abs=self._tally.max_abs, extra=extra)


class LowRank:
    name = "lowrank"
    Params = LowRankParams

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        """Whether some rank saves bytes on this shape (whether the requested one does is the encoder's to
        see: it hands the tensor to exact, with `stored: exact` in its meta)."""
        return len(shape) >= 2 and saving_rank(*matrix(shape)) > 0

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: LowRankParams,
                out: PartWriter) -> LowRankEncoder | ExactEncoder:
        target = target_rank(shape, params)
        if target is None:
            return fallback_encoder(shape, compute, out)
        return LowRankEncoder(shape, compute, params, target, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        """The rows covering the range, U[rows] @ V, sliced. V is read whole each call: decode in ranges of
        many rows where V is large."""
        if stored_exact(meta):
            return EXACT.decode_into(parts, meta, shape, start, out)
        count = out.numel()
        if count == 0 or meta["rank"] == 0:
            out.zero_()
            return None
        self.patch(parts, meta, shape, start, count, out.dtype).dense_into(0, out)
        return None

    def patch(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int, count: int,
              dtype: torch.dtype) -> RowsPatch | None:
        """The factors over flat range [start, start + count): U's covering rows and V, for the kernel to form
        U V chunk by chunk (compute/patches.py); None where the tensor is stored exact or has rank 0 (the
        dense decode is then as cheap)."""
        r = meta.get("rank", 0)
        if stored_exact(meta) or count == 0 or r == 0:
            return None
        n = matrix(shape)[1]
        first, last = start // n, (start + count - 1) // n
        u = read_tensor(parts, "U", torch.float32, first * r, (last - first + 1) * r).view(-1, r)
        v = read_tensor(parts, "V", torch.float32, 0, r * n).view(r, n)
        return RowsPatch(start, count, u, v)
