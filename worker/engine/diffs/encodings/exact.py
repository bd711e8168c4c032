"""`exact`: the delta in the compute dtype, lossless (bit for bit: -0.0, subnormals, infinities). Frames of
2**18 elements, each byte-plane shuffled (all the elements' lowest bytes, then the next ...: a delta of two
bf16 tensors has mostly-zero low bytes and a sign/exponent plane of few values) and zstd-compressed.

Parts: `frames` U8 (the compressed frames one after another), `offsets` I64 (frame i's bytes are
[offsets[i], offsets[i+1]); as many as frames + 1). Meta: `dtype` (F32/F64, as computed), `frame`.

Level 1, measured on a bf16 fine-tune's delta (w ~ N(0, 0.02), f = bf16(w + N(0, 2e-4)), d = f - w in float32):
0.775 bytes an element (0.39 of the fine-tune's bf16 bytes), where level 3 gave 0.84, 9 0.81 and 19 0.76 at a
hundredth of the speed; and level 1 is the fastest of those that compress well (negative levels: 1.2-1.4)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch
import zstandard
from pydantic import BaseModel

from worker.engine.diffs.encoding_params import ExactParams
from worker.engine.diffs.encodings.base import EncodedInfo, PartReader, PartWriter
from worker.engine.diffs.encodings.common import STORED_EXACT, as_bytes, compute_name, numel, read_tensor

FRAME = 1 << 18
LEVEL = 1
NUMPY = {"F32": np.float32, "F64": np.float64}
_local = threading.local()  # one decompression context per thread: decoders run in several at once


def shuffle(values: torch.Tensor) -> memoryview:
    """The bytes of a 1-D tensor by plane: byte 0 of every element, then byte 1, ... (numpy's transpose: torch's
    of a uint8 grid ran at a tenth of its speed)."""
    grid = values.contiguous().numpy().view(np.uint8).reshape(-1, values.element_size())
    return memoryview(np.ascontiguousarray(grid.T).reshape(-1))


def unshuffle(planes: bytes, dtype: str) -> torch.Tensor:
    kind = np.dtype(NUMPY[dtype])
    grid = np.frombuffer(planes, dtype=np.uint8).reshape(kind.itemsize, -1)
    values = np.empty((grid.shape[1], kind.itemsize), dtype=np.uint8)
    for i in range(kind.itemsize):  # plane by plane: faster than a transposing copy
        values[:, i] = grid[i]
    return torch.from_numpy(values.view(kind).reshape(-1))


WORDS = {4: np.uint32, 8: np.uint64}


def unshuffle_into(planes: bytes, dtype: str, lo: int, out: torch.Tensor) -> None:
    """Elements [lo, lo + out.numel()) of a shuffled frame, into `out` without a temporary: each element's
    word built from its planes, most significant first (w = w << 8 | plane), which is the byte order on a
    little-endian machine; unshuffle()'s plane copies and a copy into `out` otherwise."""
    size = np.dtype(NUMPY[dtype]).itemsize
    if sys.byteorder != "little" or not out.is_contiguous() or out.numpy().dtype != NUMPY[dtype]:
        out.copy_(unshuffle(planes, dtype)[lo:lo + out.numel()])
        return
    grid = np.frombuffer(planes, dtype=np.uint8).reshape(size, -1)[:, lo:lo + out.numel()]
    word = out.numpy().view(WORDS[size])
    np.copyto(word, grid[size - 1], casting="safe")
    for i in range(size - 2, -1, -1):
        np.left_shift(word, 8, out=word)
        np.bitwise_or(word, grid[i], out=word)


class ExactEncoder:
    """Frames compressed as they fill; a partial frame is held (copied) until the next chunk completes it, so
    any cut of the chunks gives the same frames."""

    passes = 1
    rows = 0

    def __init__(self, shape: tuple[int, ...], compute: torch.dtype, out: PartWriter,
                 marker: dict | None = None) -> None:
        self.dtype, self.numel, self.compute = compute_name(compute), numel(shape), compute
        self.marker = marker or {}  # meta of an encoding that handed this tensor to exact
        self._frames = out.part("frames", "U8")
        self._out = out
        self._offsets = [0]
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0
        self._cctx = zstandard.ZstdCompressor(level=LEVEL)

    def feed(self, pass_index: int, start: int, delta: torch.Tensor) -> None:
        if delta.dtype != self.compute:  # the bytes are stored as they come: they must be what meta says
            raise ValueError(f"exact was set up for {self.compute}, fed {delta.dtype}")
        delta = delta.reshape(-1)
        i, n = 0, delta.numel()
        if self._pending_n:
            i = min(FRAME - self._pending_n, n)
            self._hold(delta[:i])
            if self._pending_n == FRAME:
                self._flush()
        while n - i >= FRAME:
            self._compress(delta[i:i + FRAME])
            i += FRAME
        if i < n:
            self._hold(delta[i:])

    def _hold(self, piece: torch.Tensor) -> None:
        self._pending.append(piece.clone())
        self._pending_n += piece.numel()

    def _flush(self) -> None:
        if self._pending_n:
            self._compress(torch.cat(self._pending))
        self._pending, self._pending_n = [], 0

    def _compress(self, frame: torch.Tensor) -> None:
        data = self._cctx.compress(shuffle(frame))
        self._frames.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def end_pass(self, pass_index: int) -> None:
        self._flush()

    def finish(self) -> EncodedInfo:
        self._out.part("offsets", "I64").write(as_bytes(torch.tensor(self._offsets, dtype=torch.int64)))
        raw = self.numel * (8 if self.dtype == "F64" else 4)
        meta = {**self.marker, "dtype": self.dtype, "frame": FRAME}
        ratio = raw / self._offsets[-1] if self._offsets[-1] else 0.0
        return EncodedInfo(meta=meta, rel_frobenius=0.0, max_abs=0.0,
                           extra={**self.marker, "compression": round(ratio, 3)})


def _dctx() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    return _local.dctx


def decode_exact(parts: PartReader, meta: dict, shape: tuple[int, ...], start: int, out: torch.Tensor) -> None:
    """Decompress only the frames covering [start, start + out.numel()) (one read of their bytes)."""
    count = out.numel()
    if count == 0:
        return
    frame, stop = meta["frame"], start + count
    first, last = start // frame, (stop - 1) // frame
    offsets = read_tensor(parts, "offsets", torch.int64, first, last - first + 2).tolist()
    blob = parts.read("frames", offsets[0], offsets[-1] - offsets[0])
    dctx, done = _dctx(), 0
    size = np.dtype(NUMPY[meta["dtype"]]).itemsize
    for j, f in enumerate(range(first, last + 1)):
        planes = dctx.decompress(blob[offsets[j] - offsets[0]:offsets[j + 1] - offsets[0]])
        lo = max(start - f * frame, 0)
        take = min(len(planes) // size - lo, count - done)
        unshuffle_into(planes, meta["dtype"], lo, out[done:done + take])
        done += take


def fallback_encoder(shape: tuple[int, ...], compute: torch.dtype, out: PartWriter) -> ExactEncoder:
    """The exact encoder for a tensor another encoding does not store (its meta says `stored: exact`)."""
    return ExactEncoder(shape, compute, out, marker=STORED_EXACT)


def stored_exact(meta: dict) -> bool:
    return meta.get("stored") == "exact"


class Exact:
    name = "exact"
    Params = ExactParams

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        return True

    def encoder(self, shape: tuple[int, ...], compute: torch.dtype, params: BaseModel,
                out: PartWriter) -> ExactEncoder:
        return ExactEncoder(shape, compute, out)

    def decode_into(self, parts: PartReader, meta: dict, shape: tuple[int, ...], start: int,
                    out: torch.Tensor) -> None:
        decode_exact(parts, meta, shape, start, out)


EXACT = Exact()
