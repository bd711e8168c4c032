"""What the encodings share: the bytes of a tensor and a tensor of bytes (as parts are written and read), the
error tally every lossy encoder keeps, and the matrix view (rows x the rest) of a tensor's shape."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.engine.diffs.encodings.base import PartReader

ITEM_SIZE = {"U8": 1, "I8": 1, "U16": 2, "I16": 2, "BF16": 2, "F16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}
COMPUTE = {torch.float32: "F32", torch.float64: "F64"}
STORED_EXACT = {"stored": "exact"}  # meta of a tensor an encoding handed to exact (see encodings/__init__.py)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix: shape[0] x the product of the rest."""
    rows = shape[0]
    return rows, (numel(shape) // rows if rows else 0)


def compute_name(dtype: torch.dtype) -> str:
    if dtype not in COMPUTE:
        raise ValueError(f"diff encodings compute in float32 or float64, not {dtype}")
    return COMPUTE[dtype]


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor (no copy when contiguous), 1-D unsigned bytes so that len() counts bytes."""
    t = t.reshape(-1)
    if t.stride(0) != 1:  # a strided view (one element passes for contiguous whatever its stride)
        t = t.new_empty(t.shape).copy_(t)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def read_tensor(parts: PartReader, name: str, dtype: torch.dtype, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a part as a 1-D tensor. A read-only view (a memory map) is copied
    once: torch wants a writable buffer, and warnings about it are process-wide state threads would race on."""
    if count <= 0:
        return torch.empty(0, dtype=dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    view = parts.read(name, start * size, count * size)
    return torch.frombuffer(bytearray(view) if view.readonly else view, dtype=dtype)


class ErrorTally:
    """||d - decoded||^2, ||d||^2 (float64) and max |d - decoded| over the chunks an encoder is fed."""

    def __init__(self) -> None:
        self.err2 = 0.0
        self.norm2 = 0.0
        self.max_abs = 0.0

    def add_norm(self, delta: torch.Tensor) -> None:
        x = delta.double().reshape(-1)
        self.norm2 += float(x.dot(x))

    def add(self, delta: torch.Tensor, decoded: torch.Tensor) -> None:
        """A chunk and what the decoder gives back for it (same shape); adds the chunk's norm too."""
        self.add_norm(delta)
        diff = delta.double().reshape(-1) - decoded.double().reshape(-1)
        self.err2 += float(diff.dot(diff))
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))

    @property
    def rel_frobenius(self) -> float:
        return relative(self.err2, self.norm2)


def relative(err2: float, norm2: float) -> float:
    """||d - decoded|| / ||d|| from the squares (0 for a zero delta, whose every encoding is exact)."""
    return math.sqrt(max(err2, 0.0) / norm2) if norm2 > 0 else 0.0


def f32(x: float) -> float:
    """x rounded to float32, as a Python float: a scale stored in meta is the float32 the decoder multiplies."""
    return float(torch.tensor(x, dtype=torch.float32))
