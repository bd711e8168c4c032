"""`exact`: the delta in the compute dtype, lossless (bit for bit: -0.0, subnormals, infinities, NaN payloads),
in frames of 2**18 elements, each zstd-compressed (level 1), each decoded alone.

A float32 delta of two bf16 (or float16) tensors is almost always a bf16 value itself: the difference of two
numbers of 8 significant bits whose exponents differ by little has few significant bits, so the low 16 bits of
its float32 pattern are zero. Layout 2 (meta `layout: 2`, what the encoder writes) stores a float32 frame as
those high halves, byte-plane shuffled (the sign/exponent plane has few values), plus its exceptions (the
elements whose low half is not zero, their offsets and low halves): half the bytes to decompress of the four
planes of layout 1, the apply's main cost (issue 15's bench: the exact decode ran 2.5x the time of the
three-model graft's reads it replaces). A frame with many exceptions (a float32 fine-tune's delta) keeps the
four planes. Each frame's stored bytes start with its kind:
  0: zstd of the frame's bytes grouped by plane (byte 0 of every element, then byte 1, ...), little-endian;
  1: zstd of [byte 2 of every element][byte 3 of every element][e: u32][e offsets in the frame: u32 ascending]
     [e low halves: u16], all little-endian; an element's float32 pattern is (byte3 << 24 | byte2 << 16 | low),
     low 0 but at the offsets listed.
Layout 1 (meta without `layout`: artifacts written before) is kind 0's zstd frames without the kind byte.

Parts: `frames` U8 (the stored frames one after another), `offsets` I64 (frame i's bytes are
[offsets[i], offsets[i+1]); as many as frames + 1). Meta: `dtype` (F32/F64, as computed), `frame`, `layout`.

Level 1, measured on a bf16 fine-tune's delta (w ~ N(0, 0.02), f = bf16(w + N(0, 2e-4)), d = f - w in float32):
0.775 bytes an element in layout 1 (0.39 of the fine-tune's bf16 bytes), where level 3 gave 0.84, 9 0.81 and 19
0.76 at a hundredth of the speed; and level 1 is the fastest of those that compress well (negative levels:
1.2-1.4). Layout 2: 0.76 bytes an element (0.5% exceptions), decoded in about half the time."""

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
from worker.engine.errors import GraftError

FRAME = 1 << 18
LEVEL = 1
LAYOUT = 2
PLANES, HIGH_HALVES = 0, 1  # a layout-2 frame's kinds (its first stored byte)
EXCEPTION_SHARE = 16  # a frame with more than 1/16 of its elements exceptions keeps its four planes
NUMPY = {"F32": np.float32, "F64": np.float64}
LITTLE = sys.byteorder == "little"
_local = threading.local()  # one decompression context (and scratch) per thread: decoders run in several at once


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


def high_halves(frame: torch.Tensor) -> bytes | None:
    """A float32 frame as a HIGH_HALVES payload (the module's docstring), or None where its exceptions (elements
    whose low 16 bits are not zero) pass 1/EXCEPTION_SHARE of it."""
    grid = frame.contiguous().numpy().view(np.uint8).reshape(-1, 4)
    low = grid[:, :2].copy().view("<u2").reshape(-1)
    at = np.flatnonzero(low)
    if at.size * EXCEPTION_SHARE > low.size:
        return None
    planes = np.ascontiguousarray(grid[:, 2:].T)
    return b"".join((planes.tobytes(), np.uint32(at.size).astype("<u4").tobytes(), at.astype("<u4").tobytes(),
                     low[at].tobytes()))


def _scratch(n: int) -> np.ndarray:
    buf = getattr(_local, "halves", None)
    if buf is None or buf.size < n:
        buf = _local.halves = np.empty(max(n, FRAME), dtype=np.uint16)
    return buf[:n]


def from_high_halves(payload: bytes, m: int, lo: int, out: torch.Tensor, tensor: str) -> None:
    """Elements [lo, lo + out.numel()) of a HIGH_HALVES frame of m elements, into float32 `out`: the high halves
    widened (a bf16 -> float32 conversion is the 16-bit shift, NaN payloads kept), then the exceptions' low
    halves set. A payload that does not add up is refused, never applied out of place."""
    take = out.numel()
    if out.dtype != torch.float32 or not out.is_contiguous():  # a wider decode (float64) of a float32 delta
        wide = torch.empty(take, dtype=torch.float32)
        from_high_halves(payload, m, lo, wide, tensor)
        out.copy_(wide)
        return
    if len(payload) < 2 * m + 4:
        raise malformed(tensor, "a frame is shorter than its elements")
    e = int(np.frombuffer(payload, "<u4", count=1, offset=2 * m)[0])
    if len(payload) != 2 * m + 4 + 6 * e:
        raise malformed(tensor, "a frame's exceptions do not add up to its length")
    planes = np.frombuffer(payload, np.uint8, count=2 * m).reshape(2, m)[:, lo:lo + take]
    halves = _scratch(take)
    np.copyto(halves, planes[1], casting="safe")
    np.left_shift(halves, 8, out=halves)
    np.bitwise_or(halves, planes[0], out=halves)
    out.copy_(torch.from_numpy(halves).view(torch.bfloat16))
    if not e:
        return
    at = np.frombuffer(payload, "<u4", count=e, offset=2 * m + 4)
    if int(at[-1]) >= m or (e > 1 and not bool((at[1:] > at[:-1]).all())):
        raise malformed(tensor, "a frame's exception offsets are not ascending within the frame")
    i, j = np.searchsorted(at, [lo, lo + take])
    if i < j:
        low = np.frombuffer(payload, "<u2", count=e, offset=2 * m + 4 + 4 * e)[i:j]
        word = out.numpy().view(np.uint32)
        word[at[i:j] - lo] |= low


def malformed(tensor: str, why: str) -> GraftError:
    return GraftError("invalid_diff", f"{tensor}: the exact encoding is malformed: {why}")


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
        halves = high_halves(frame) if self.dtype == "F32" and LITTLE else None
        kind, payload = (PLANES, shuffle(frame)) if halves is None else (HIGH_HALVES, halves)
        data = bytes([kind]) + self._cctx.compress(payload)
        self._frames.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def end_pass(self, pass_index: int) -> None:
        self._flush()

    def finish(self) -> EncodedInfo:
        self._out.part("offsets", "I64").write(as_bytes(torch.tensor(self._offsets, dtype=torch.int64)))
        raw = self.numel * (8 if self.dtype == "F64" else 4)
        meta = {**self.marker, "dtype": self.dtype, "frame": FRAME, "layout": LAYOUT}
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
    _check_meta(meta, _name(parts))
    frame, stop = meta["frame"], start + count
    first, last = start // frame, (stop - 1) // frame
    offsets = read_tensor(parts, "offsets", torch.int64, first, last - first + 2).tolist()
    if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise malformed(_name(parts), "its frame offsets go backwards")
    blob = parts.read("frames", offsets[0], offsets[-1] - offsets[0])
    dctx, done, layout = _dctx(), 0, meta.get("layout", 1)
    size, n = np.dtype(NUMPY[meta["dtype"]]).itemsize, numel(shape)
    for j, f in enumerate(range(first, last + 1)):
        stored = blob[offsets[j] - offsets[0]:offsets[j + 1] - offsets[0]]
        kind = PLANES
        if layout >= 2:
            kind, stored = (stored[0] if len(stored) else -1), stored[1:]
        if kind not in (PLANES, HIGH_HALVES) or (kind == HIGH_HALVES and meta["dtype"] != "F32"):
            raise malformed(_name(parts), f"a frame of unknown kind {kind}")
        lo, m = max(start - f * frame, 0), min(frame, n - f * frame)
        take = min(m - lo, count - done)
        payload = _decompress(dctx, stored, kind, m, size, _name(parts))
        if kind == HIGH_HALVES:
            from_high_halves(payload, m, lo, out[done:done + take], _name(parts))
        else:  # its length is m * size: _decompress held the frame to the size it declares
            unshuffle_into(payload, meta["dtype"], lo, out[done:done + take])
        done += take


def _name(parts: PartReader) -> str:
    return getattr(parts, "tensor", "an exact tensor")


def _check_meta(meta: dict, tensor: str) -> None:
    """The meta an artifact gives (a user's file: its sha256 only says it is what its own manifest lists)."""
    frame, layout = meta.get("frame"), meta.get("layout", 1)
    if type(frame) is not int or not 0 < frame <= 1 << 24:
        raise malformed(tensor, f"frame {frame!r} is not an element count")
    if meta.get("dtype") not in NUMPY:
        raise malformed(tensor, f"dtype {meta.get('dtype')!r} is not F32 or F64")
    if type(layout) is not int or layout not in (1, LAYOUT):
        raise malformed(tensor, f"layout {layout!r} is not one this reader knows (1, {LAYOUT})")


def _decompress(dctx, stored, kind: int, m: int, size: int, tensor: str) -> bytes:
    """A frame's payload, its declared size checked against what its kind holds before anything is allocated:
    a frame may declare any size (a few bytes of zstd can claim terabytes)."""
    most = m * size if kind == PLANES else 2 * m + 4 + 6 * m
    least = m * size if kind == PLANES else 2 * m + 4
    try:
        declared = zstandard.frame_content_size(stored)
        if not least <= declared <= most:
            raise malformed(tensor, f"a frame declares {declared} bytes where its {m} elements hold "
                            f"{least}" + (f" to {most}" if most != least else ""))
        return dctx.decompress(stored, max_output_size=most)
    except zstandard.ZstdError as exc:
        raise malformed(tensor, f"a frame does not decompress ({exc})") from exc


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
