"""`sign`: BitDelta's training-free form (Liu et al. 2024, before its scale distillation): one bit a element,
the delta's sign, and one scale a matrix, c = mean |d| over all its elements. For fixed signs s the L2-best c
minimises sum (d_i - c s_i)^2, whose derivative is zero at c = sum s_i d_i / n = sum |d_i| / n (s_i d_i = |d_i|,
and 0 for a zero d_i whatever its bit), so mean |d| is the optimum.

Zeros (an element the fine-tune left as it was: common in bf16 fine-tunes, where a small update rounds away)
decode as +c or -c: a bit has no third value. Any choice costs the same error c per zero; what differs is its
shape. One sign for all (d > 0, or the IEEE sign bit) adds c * (zero fraction) to every element: a mean shift,
rank one, whose effect on a layer's output grows with the whole row. So a zero's bit is a hash of its element
index (murmur3's finaliser): the zeros' error is then spread like noise of mean ~0, and the same for any chunk
cut. 1-D and empty tensors are not matrices: stored exact.

Parts: `bits` U8 (bit i % 8 of byte i // 8 is element i; 1: +c, 0: -c). Meta: `scale` (the float32 c)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel

from worker.engine.diffs.encoding_params import SignParams
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import as_bytes, compute_name, f32, numel, read_tensor, relative
from worker.engine.diffs.encodings.exact import EXACT, ExactEncoder, fallback_encoder, stored_exact

_M32 = 0xFFFFFFFF
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 without an int64 overflow: c split into 16-bit halves."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def zero_bits(index: torch.Tensor) -> torch.Tensor:
    """A pseudo-random bit per element index (int64): murmur3's 32-bit finaliser of the folded index."""
    x = (index ^ (index >> 32)) & _M32
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return ((x ^ (x >> 16)) & 1).bool()


def pack(bits: torch.Tensor) -> torch.Tensor:
    """Bools (a multiple of 8) packed little-endian into bytes."""
    return (bits.view(-1, 8).to(torch.uint8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack(data: torch.Tensor) -> torch.Tensor:
    return ((data[:, None] >> _SHIFTS) & 1).reshape(-1).bool()


class SignEncoder:
    passes = 1
    rows = 0

    def __init__(self, shape: tuple[int, ...], compute: torch.dtype, out: PartWriter) -> None:
        compute_name(compute)
        self.numel = numel(shape)
        self._bits = out.part("bits", "U8")
        self._carry = torch.empty(0, dtype=torch.bool)  # bits of an unfinished byte
        self.sum_abs = self.sum_sq = 0.0
        self.max_abs, self.min_abs = 0.0, math.inf
        self.zeros = 0

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        delta = delta.reshape(-1)
        bits = delta > 0
        zero = (delta == 0).nonzero().reshape(-1)
        if zero.numel():
            bits[zero] = zero_bits(zero + start)
            self.zeros += zero.numel()
        bits = torch.cat([self._carry, bits])
        whole = bits.numel() // 8 * 8
        self._bits.write(as_bytes(pack(bits[:whole])))
        self._carry = bits[whole:].clone()
        mag = delta.abs().double()
        self.sum_abs += float(mag.sum())
        self.sum_sq += float(mag.dot(mag))
        if mag.numel():
            self.max_abs, self.min_abs = max(self.max_abs, float(mag.max())), min(self.min_abs, float(mag.min()))

    def end_pass(self, pass_index: int) -> None:
        if self._carry.numel():
            padded = torch.zeros(8, dtype=torch.bool)
            padded[:self._carry.numel()] = self._carry
            self._bits.write(as_bytes(pack(padded)))
            self._carry = self._carry[:0]

    def finish(self) -> EncodedInfo:
        n = self.numel
        c = f32(self.sum_abs / n) if n else 0.0
        # sum (|d| - c)^2 expanded: each element's error is ||d| - c| (a zero's: c), whatever its bit.
        err2 = self.sum_sq - 2 * c * self.sum_abs + n * c * c
        worst = max(self.max_abs - c, c - self.min_abs) if n else 0.0
        return EncodedInfo(meta={"scale": c}, rel_frobenius=relative(err2, self.sum_sq), max_abs=worst,
                           extra={"scale": c, "zeros": self.zeros})


class Sign:
    name = "sign"
    Params = SignParams

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2 and numel(shape) > 0

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: BaseModel,
                out: PartWriter) -> SignEncoder | ExactEncoder:
        return SignEncoder(shape, compute, out) if self.applies_to(shape) else fallback_encoder(shape, compute, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        if stored_exact(meta):
            return EXACT.decode_into(parts, meta, shape, start, out)
        count = out.numel()
        if count == 0:
            return None
        first, last = start // 8, (start + count - 1) // 8
        data = read_tensor(parts, "bits", torch.uint8, first, last - first + 1).to(torch.int32)
        c = torch.tensor(meta["scale"], dtype=out.dtype)
        table = torch.where(unpack(torch.arange(256, dtype=torch.uint8)).view(256, 8), c, -c)  # byte -> 8 values
        if start % 8 == 0 and count % 8 == 0:  # whole bytes: looked up straight into `out`
            torch.index_select(table, 0, data, out=out.view(-1, 8))
        else:
            skip = start - first * 8
            out.copy_(table.index_select(0, data).view(-1)[skip:skip + count])
        return None
