"""`int8`: symmetric per-row quantisation of the delta seen as a matrix (shape[0] rows x the rest):
scale = max|row| / 127 (float32; 0 for a zero row), q = round(d / scale) (half to even, in float64 against the
stored float32 scale), clamped to [-127, 127]; decoded as q * scale in the compute dtype. A 1-D tensor (or an
empty one) is not a matrix: stored exact.

Parts: `q` I8 (the flat codes, written as the rows come), `scale` F32 (one a row). Meta: none."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from worker.engine.diffs.encoding_params import Int8Params
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import ErrorTally, as_bytes, compute_name, matrix, numel, read_tensor
from worker.engine.diffs.encodings.exact import EXACT, ExactEncoder, fallback_encoder, stored_exact


def quantise(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales float32) of a (rows, length) block."""
    scale = (rows.abs().amax(1).double() / 127).float()
    divisor = torch.where(scale > 0, scale, 1.0).double()  # a zero row (or a scale under float32's range): q 0
    q = torch.round(rows.double() / divisor[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale elementwise (scale already spread to q's elements), in the compute dtype."""
    return q.to(dtype) * scale.to(dtype)


class Int8Encoder:
    passes = 1

    def __init__(self, shape: tuple[int, ...], compute: torch.dtype, out: PartWriter) -> None:
        compute_name(compute)
        self.dtype = compute
        self.rows = matrix(shape)[1]  # chunks of whole rows: each row's scale from the row itself
        self._out = out
        self._q = out.part("q", "I8")
        self._scales: list[torch.Tensor] = []
        self._tally = ErrorTally()

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        if start % self.rows or delta.numel() % self.rows:
            raise ValueError(f"int8 is fed whole rows of {self.rows} elements")
        block = delta.reshape(-1, self.rows)
        q, scale = quantise(block)
        self._q.write(as_bytes(q))
        self._scales.append(scale)
        self._tally.add(block, dequantise(q, scale[:, None], self.dtype))

    def end_pass(self, pass_index: int) -> None:
        pass

    def finish(self) -> EncodedInfo:
        scales = torch.cat(self._scales) if self._scales else torch.empty(0)
        self._out.part("scale", "F32").write(as_bytes(scales))
        zero_rows = int((scales == 0).sum())
        return EncodedInfo(meta={}, rel_frobenius=self._tally.rel_frobenius, max_abs=self._tally.max_abs,
                           extra={"zero_rows": zero_rows})


class Int8:
    name = "int8"
    Params = Int8Params

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2 and numel(shape) > 0

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: BaseModel,
                out: PartWriter) -> Int8Encoder | ExactEncoder:
        return Int8Encoder(shape, compute, out) if self.applies_to(shape) else fallback_encoder(shape, compute, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        if stored_exact(meta):
            return EXACT.decode_into(parts, meta, shape, start, out)
        count = out.numel()
        if count == 0:
            return None
        length = matrix(shape)[1]
        first, last = start // length, (start + count - 1) // length
        scale = read_tensor(parts, "scale", torch.float32, first, last - first + 1).to(out.dtype)
        out.copy_(read_tensor(parts, "q", torch.int8, start, count))  # q widened in place, then q x scale
        # by rows, in place (no spread scale, no product temporary): the first and last rows may be cut
        head = min(count, (first + 1) * length - start)
        out[:head].mul_(scale[0])
        whole = (count - head) // length
        if whole:
            out[head:head + whole * length].view(whole, length).mul_(scale[1:1 + whole, None])
        if head + whole * length < count:
            out[head + whole * length:].mul_(scale[-1])
        return None
