"""A diff artifact's delta over one element range, kept in its encoding's structure for the plain kernel
(Arithmetic.apply_patch) instead of decoded to a dense float32 buffer: applying a sparse or low-rank diff then
costs the target's bytes plus the few the structure holds, where the dense delta cost more CPU to form and read
than the bytes it saved (issue 15's apply bench: decode 22 thread-seconds for sparse-0.1 against the
three-model graft's 6.6 kernel seconds).

Every patch can also form the dense delta of any sub-range (`dense_into`): exactly the float values the
encoding's decode_into writes, so a chunk the fast path does not take (a non-finite target, an accelerator)
goes through the dense kernel with the same bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SparsePatch:
    """Zero but at `positions` (int64, ascending, relative to `start`), which hold `values` (compute dtype)."""

    start: int
    count: int
    positions: torch.Tensor
    values: torch.Tensor

    def bounds(self, cuts: torch.Tensor) -> list[int]:
        """Where each relative element index of `cuts` falls in `positions` (the entries before it)."""
        return torch.searchsorted(self.positions, cuts).tolist()

    def dense_into(self, lo: int, out: torch.Tensor) -> None:
        hi = lo + out.numel()
        k0, k1 = self.bounds(torch.tensor([lo, hi], dtype=torch.int64))
        out.zero_()
        out[self.positions[k0:k1] - lo] = self.values[k0:k1].to(out.dtype)

    def slice(self, lo: int, hi: int) -> SparsePatch:
        k0, k1 = self.bounds(torch.tensor([lo, hi], dtype=torch.int64))
        return SparsePatch(self.start + lo, hi - lo, self.positions[k0:k1] - lo, self.values[k0:k1])


@dataclass
class RowsPatch:
    """A low-rank delta U V: `u` holds the rows covering the range (from row start // n), `v` is [r, n]."""

    start: int
    count: int
    u: torch.Tensor
    v: torch.Tensor

    @property
    def n(self) -> int:
        return self.v.shape[1]

    def rows_of(self, lo: int, hi: int) -> tuple[int, int, int]:
        """(first row, row past the last, offset of element lo in the first row) of relative range [lo, hi),
        rows counted in `u`."""
        n, first = self.n, self.start // self.n
        a, b = (self.start + lo) // n, (self.start + hi - 1) // n + 1
        return a - first, b - first, (self.start + lo) % n

    def product(self, lo: int, hi: int, dtype: torch.dtype, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """U V over relative range [lo, hi) in `dtype` (as decode_into forms it: the covering rows' product,
        sliced), in `scratch` when one is given (at least the covering rows' elements)."""
        a, b, skip = self.rows_of(lo, hi)
        u, v = self.u[a:b].to(dtype), self.v.to(dtype)
        if scratch is None:
            rows = u @ v
        else:
            rows = torch.mm(u, v, out=scratch[:(b - a) * self.n].view(b - a, self.n))
        return rows.view(-1)[skip:skip + hi - lo]

    def dense_into(self, lo: int, out: torch.Tensor) -> None:
        out.copy_(self.product(lo, lo + out.numel(), out.dtype))

    def slice(self, lo: int, hi: int) -> RowsPatch:
        a, b, _skip = self.rows_of(lo, hi)
        return RowsPatch(self.start + lo, hi - lo, self.u[a:b], self.v)


@dataclass
class StoredPatch:
    """The delta as stored (bfloat16): the kernel widens each chunk as it reads it."""

    start: int
    count: int
    values: torch.Tensor

    def dense_into(self, lo: int, out: torch.Tensor) -> None:
        out.copy_(self.values[lo:lo + out.numel()])

    def slice(self, lo: int, hi: int) -> StoredPatch:
        return StoredPatch(self.start + lo, hi - lo, self.values[lo:hi])


Patch = SparsePatch | RowsPatch | StoredPatch


def rows_needed(patch: Patch, step: int) -> int:
    """Scratch elements a chunk of `step` elements of a RowsPatch needs (its covering rows)."""
    return (step // patch.n + 2) * patch.n if isinstance(patch, RowsPatch) else step


@runtime_checkable
class PatchSource(Protocol):
    """A store that can keep a delta file's structure for the plain kernel (the diff artifact's)."""

    def keep_structure(self, files: set[str]) -> None: ...

    def take_patch(self, file: str, start: int, stop: int) -> Patch | None: ...
