"""A tensor's parts held in memory: a PartWriter and PartReader in one (tests, small tensors), which logs the
reads so a test can see that a range decode reads only what it needs."""

from __future__ import annotations

import torch

from worker.engine.diffs.encodings.common import ITEM_SIZE

TORCH = {"U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16, "BF16": torch.bfloat16,
         "F16": torch.float16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64}


class _Sink:
    def __init__(self, owner: MemoryParts, name: str) -> None:
        self.owner, self.name = owner, name

    def write(self, data: bytes | memoryview) -> None:
        if self.owner.open != self.name:
            raise RuntimeError(f"part {self.name!r} written after the next one was opened")
        self.owner.data[self.name] += memoryview(data).cast("B")


class MemoryParts:
    """Parts by name: bytes, their dtype, and every read as (name, start, length)."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.dtypes: dict[str, str] = {}
        self.open: str | None = None
        self.reads: list[tuple[str, int, int]] = []

    def part(self, name: str, dtype: str) -> _Sink:
        if name in self.data:
            raise ValueError(f"part {name!r} written twice")
        if dtype not in ITEM_SIZE:
            raise ValueError(f"unknown part dtype {dtype!r}")
        self.data[name], self.dtypes[name], self.open = bytearray(), dtype, name
        return _Sink(self, name)

    def nbytes(self, name: str) -> int:
        return len(self.data[name])

    def read(self, name: str, start: int, length: int) -> memoryview:
        data = self.data[name]
        if start < 0 or length < 0 or start + length > len(data):
            raise ValueError(f"read [{start}, {start + length}) past part {name!r} of {len(data)} bytes")
        self.reads.append((name, start, length))
        return memoryview(bytes(data[start:start + length]))  # read-only, as a memory-mapped file's would be

    def tensor(self, name: str) -> torch.Tensor:
        """A whole part as the 1-D tensor of its dtype (a copy)."""
        data, dtype = self.data[name], TORCH[self.dtypes[name]]
        if len(data) % ITEM_SIZE[self.dtypes[name]]:
            raise ValueError(f"part {name!r}: {len(data)} bytes is no whole number of {self.dtypes[name]}")
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)

    @property
    def total_bytes(self) -> int:
        return sum(len(d) for d in self.data.values())
