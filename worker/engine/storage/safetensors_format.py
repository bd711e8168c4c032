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

from worker.engine.errors import GraftError

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
MAX_COUNT = 1 << 63  # dims and offsets are 64-bit in the format (and in torch)
MAX_RANK = 64  # dimensions of one tensor: far past any real one
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


MAX_JSON_DEPTH = 64  # nesting of config/index JSON; real ones nest a handful of levels


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_json(raw: bytes, what: str, code: str, *, unique_keys: bool = False) -> object:
    """Parse untrusted JSON; every failure (bad UTF-8 or syntax, nesting past the recursion limit, an
    integer too long to convert, a repeated key where asked) is GraftError(code)."""
    hook = _refuse_duplicates if unique_keys else None
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except RecursionError:
        raise GraftError(code, f"{what} is nested too deeply") from None
    except _DuplicateKey as exc:
        raise GraftError(code, f"{what} has a {exc}; which value holds is ambiguous") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise GraftError(code, f"{what} is not valid JSON: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise GraftError(code, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def json_depth(value: object) -> int:
    """Nesting depth of parsed JSON, without recursion (what we parse may be as deep as the parser allows)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _is_count(value: object) -> bool:
    # bool is an int subclass: `true` in a shape or offset is malformed, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a JSON escape can smuggle in a lone surrogate, which no writer can encode
    except UnicodeEncodeError:
        return False
    return True


def _parse_entry(name: str, entry: object, where: str, data_start: int, file: str,
                 file_size: int) -> TensorInfo:
    if not _utf8(name):
        raise GraftError("invalid_safetensors", f"{where}: a tensor name is not valid UTF-8")
    shown = repr(name) if len(name) <= 100 else repr(name[:100]) + "..."
    if not isinstance(entry, dict):
        raise GraftError("invalid_safetensors", f"{where}: entry {shown} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        kind = repr(dtype) if isinstance(dtype, str) and len(dtype) <= 40 else type(dtype).__name__
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} has unknown dtype {kind}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_is_count(d) for d in shape)):
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} has a malformed shape")
    if math.prod(d for d in shape if d) >= MAX_COUNT:
        # An empty tensor can still name absurd sizes; torch (and the safetensors library) refuse them.
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} has a shape too large to address")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} has malformed data_offsets")
    begin, end = offsets
    if end < begin:
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} has offsets out of order")
    if end - begin != math.prod(shape) * itemsize(dtype):
        raise GraftError("invalid_safetensors",
                         f"{where}: tensor {shown}: {end - begin} bytes do not hold {dtype}{list(shape)}")
    if data_start + end > file_size:
        raise GraftError("invalid_safetensors", f"{where}: tensor {shown} lies past the end of the file")
    return TensorInfo(name, file, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_metadata(metadata: object, where: str) -> dict[str, str]:
    # The format's metadata is a string-to-string map (the safetensors library refuses anything else).
    if not isinstance(metadata, dict):
        raise GraftError("invalid_safetensors", f"{where}: __metadata__ is not an object")
    for key, value in metadata.items():
        if not (isinstance(value, str) and _utf8(key) and _utf8(value)):
            raise GraftError("invalid_safetensors", f"{where}: __metadata__ values must be strings")
    return metadata


def parse_header(raw: bytes, *, where: str, file: str, file_size: int) -> tuple[dict[str, TensorInfo], dict]:
    """Check a header (the JSON after the length word) against the file size; return tensors and metadata."""
    data_start = 8 + len(raw)
    if data_start > file_size:
        raise GraftError("invalid_safetensors", f"{where}: header runs past the end of the file (truncated?)")
    header = load_json(raw, f"{where}: header", "invalid_safetensors", unique_keys=True)
    if not isinstance(header, dict):
        raise GraftError("invalid_safetensors", f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = _check_metadata({} if metadata is None else metadata, where)
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info = tensors[name] = _parse_entry(name, entry, where, data_start, file, file_size)
        spans.append((info.start - data_start, info.end - data_start, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise GraftError("invalid_safetensors", f"{where}: tensor {name[:100]!r} overlaps the tensor before it")
        if begin > cursor:
            raise GraftError("invalid_safetensors", f"{where}: gap in the data before tensor {name[:100]!r}")
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
