"""What every encoding of a diff provides: an encoder fed the delta in element order (one or more passes, at
bounded memory), the parts it writes, and a decoder that rebuilds any element range from those parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import BaseModel


class PartSink(Protocol):
    """One encoded part being written: bytes appended in order."""

    def write(self, data: bytes | memoryview) -> None: ...


class PartWriter(Protocol):
    """Where an encoder writes a tensor's parts. Each part is a 1-D array of `dtype` (a safetensors dtype
    name: "U8", "I8", "I64", "F32", "BF16", ...) whose length is what was written; parts are written one after
    another (open the next once done with the last)."""

    def part(self, name: str, dtype: str) -> PartSink: ...


class PartReader(Protocol):
    """Ranged reads of a tensor's parts as written."""

    def nbytes(self, name: str) -> int: ...

    def read(self, name: str, start: int, length: int) -> memoryview:
        """Bytes [start, start + length) of part `name`."""


@dataclass
class EncodedInfo:
    meta: dict  # small and JSON-able: what the decoder needs besides the parts
    rel_frobenius: float  # ||d - decoded|| / ||d|| (0 when d is zero)
    max_abs: float  # max |d - decoded|
    extra: dict = field(default_factory=dict)  # reported as is (kept fraction, rank, retained energy ...)


class TensorEncoder(Protocol):
    passes: int  # how many times the whole tensor is fed
    rows: int  # chunks hold whole rows of this many elements (0: any cut)

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        """Flat elements [start, start + delta.numel()) of the delta, in order; each pass covers the tensor
        once. `delta` is the caller's buffer: copy what must outlive the call."""

    def end_pass(self, pass_index: int) -> None: ...

    def finish(self) -> EncodedInfo:
        """After the last pass; every part is written by now."""


class Encoding(Protocol):
    name: str
    Params: type[BaseModel]

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        """Whether this encoding stores a tensor of this shape (otherwise it is stored exact)."""

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: BaseModel,
                out: PartWriter) -> TensorEncoder: ...

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        """Fill `out` (1-D, the compute dtype) with the decoded delta's flat elements
        [start, start + out.numel())."""
