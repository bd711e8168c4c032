"""The safetensors file layout: parsing and checking a header, and building one for a shard we write.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data; every tensor's
`data_offsets` are relative to the data start and must tile it exactly.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from .errors import GraftError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Float dtypes we can add deltas to; float8 is stored-only (copied, never transferred).
ARITHMETIC_FLOATS = {"F64", "F32", "F16", "BF16"}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(prefix: bytes, where: str, cap: int) -> int:
    if len(prefix) < 8:
        raise GraftError("invalid_safetensors", f"{where}: file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0:
        raise GraftError("invalid_safetensors", f"{where}: empty header")
    if n > cap:
        raise GraftError("invalid_safetensors", f"{where}: header of {n} bytes exceeds the {cap}-byte cap")
    return n


def parse_header(raw: bytes, *, where: str, file: str, file_size: int) -> tuple[dict[str, TensorInfo], dict]:
    """Check a header (the JSON after the length word) against the file size; return tensors and metadata."""
    data_start = 8 + len(raw)
    if data_start > file_size:
        raise GraftError("invalid_safetensors", f"{where}: header runs past the end of the file (truncated?)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraftError("invalid_safetensors", f"{where}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise GraftError("invalid_safetensors", f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise GraftError("invalid_safetensors", f"{where}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise GraftError("invalid_safetensors", f"{where}: entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} has malformed data_offsets")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} has offsets out of order")
        if end - begin != math.prod(shape) * itemsize(dtype):
            raise GraftError(
                "invalid_safetensors",
                f"{where}: tensor {name!r}: {end - begin} bytes do not hold {dtype}{list(shape)}",
            )
        if data_start + end > file_size:
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} lies past the end of the file")
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise GraftError("invalid_safetensors", f"{where}: tensor {name!r} overlaps the tensor before it")
        if begin > cursor:
            raise GraftError("invalid_safetensors", f"{where}: gap in the data before tensor {name!r}")
        cursor = end
    if data_start + cursor != file_size:
        # The offsets must tile the data exactly (the safetensors library refuses such files too): bytes
        # past the last tensor mean a header that does not describe the file it is in.
        raise GraftError("invalid_safetensors", f"{where}: {file_size - data_start - cursor} bytes past the last "
                         "tensor; the header does not describe the whole file")
    return tensors, metadata


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length word included) and each tensor's data offsets, in the order given."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    cursor = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        offsets.append((cursor, cursor + size))
        cursor += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
