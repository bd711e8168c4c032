"""`bf16`: the delta rounded once to bfloat16 (round to nearest, ties to even, as torch's `.to(torch.bfloat16)`
rounds float32; a float64 delta is rounded to float32 by round-to-odd first, so that its two roundings give the
single rounding's result). Part: `values` BF16 (the flat delta). Meta: none."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from worker.engine.compute.patches import StoredPatch
from worker.engine.diffs.encoding_params import Bf16Params
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import ErrorTally, as_bytes, compute_name, read_tensor


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded once to bfloat16. torch rounds float64 through float32 (two roundings: a value just past a
    bf16 tie can land on it, then go to even); rounding to float32 by round-to-odd (truncate, then set the
    last bit when inexact) keeps the information the second rounding needs, float32 having 16 bits more."""
    if x.dtype == torch.float32:
        return x.to(torch.bfloat16)
    f = x.float()
    away = f.double().abs() > x.abs()  # float32 rounding went away from zero: step back towards it
    f = torch.where(away, torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = (f.double() != x).to(torch.int32)
    return (f.view(torch.int32) | inexact).view(torch.float32).to(torch.bfloat16)


class Bf16Encoder:
    passes = 1
    rows = 0

    def __init__(self, compute: torch.dtype, out: PartWriter) -> None:
        compute_name(compute)
        self._values = out.part("values", "BF16")
        self._tally = ErrorTally()

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        rounded = to_bf16(delta.reshape(-1))
        self._values.write(as_bytes(rounded))
        self._tally.add(delta, rounded)

    def end_pass(self, pass_index: int) -> None:
        pass

    def finish(self) -> EncodedInfo:
        return EncodedInfo(meta={}, rel_frobenius=self._tally.rel_frobenius, max_abs=self._tally.max_abs)


class Bf16:
    name = "bf16"
    Params = Bf16Params

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        return True

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: BaseModel,
                out: PartWriter) -> Bf16Encoder:
        return Bf16Encoder(compute, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        out.copy_(read_tensor(parts, "values", torch.bfloat16, start, out.numel()))

    def patch(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int, count: int,
              dtype: torch.dtype) -> StoredPatch:
        """The stored bfloat16 values, which the kernel widens as it reads them (half the bytes of the float32
        delta through memory)."""
        return StoredPatch(start, count, read_tensor(parts, "values", torch.bfloat16, start, count))


BF16 = Bf16()
