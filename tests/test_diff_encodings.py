"""The diff encodings (worker/engine/diffs/encodings/) against float64 references written here: exact's bits
(-0.0, infinities, subnormals), bf16's single rounding, int8's per-row codes, sign's mean |d|, sparse's top-k
by a stable argsort, lowrank against numpy's SVD; range decodes, chunk cuts, parameters refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from worker.engine.diffs.encodings import ENCODINGS, FALLBACK, EncodingParams
from worker.engine.diffs.encodings.exact import FRAME as EXACT_FRAME
from worker.engine.diffs.encodings.memory_parts import MemoryParts
from worker.engine.diffs.encodings.sparse import FRAME as SPARSE_FRAME

PARAMS = TypeAdapter(EncodingParams)


def params(spec):
    return PARAMS.validate_python(spec)


def bf16_delta(shape, seed=0, dtype=torch.float32):
    """A fine-tune's delta as extraction sees it: bf16 weights w ~ N(0, 0.02), f = bf16(w + N(0, 2e-4))."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    f = (w.float() + torch.randn(shape, generator=g) * 2e-4).to(torch.bfloat16)
    return f.to(dtype) - w.to(dtype)


def encode(name, delta, spec=None, chunk=None):
    """Encode `delta` fed in chunks of about `chunk` elements (whole rows where the encoder asks) through one
    reused buffer, spoilt after each feed: the encoder must copy what it keeps."""
    encoding, parts = ENCODINGS[name], MemoryParts()
    encoder = encoding.encoder(tuple(delta.shape), delta.dtype, params(spec or name), parts)
    flat = delta.reshape(-1)
    step = max(1, chunk or flat.numel())
    if encoder.rows:
        step = max(encoder.rows, step // encoder.rows * encoder.rows)
    buffer = torch.empty(step, dtype=delta.dtype)
    for p in range(encoder.passes):
        for start in range(0, flat.numel(), step):
            piece = buffer[:min(step, flat.numel() - start)]
            piece.copy_(flat[start:start + piece.numel()])
            encoder.feed(p, start, piece)
            piece.fill_(math.nan)
        encoder.end_pass(p)
    return parts, encoder.finish()


def decode(name, parts, info, shape, start=0, count=None, dtype=torch.float32):
    n = math.prod(shape)
    out = torch.full((n - start if count is None else count,), math.nan, dtype=dtype)
    ENCODINGS[name].decode_into(parts, info.meta, tuple(shape), start, out)
    return out


def errors(delta, decoded):
    """(||d - d^|| / ||d||, max |d - d^|) in float64."""
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    e = d - np.asarray(decoded, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(d)
    return (float(np.linalg.norm(e) / norm) if norm else 0.0), (float(np.abs(e).max()) if e.size else 0.0)


def assert_errors(info, delta, decoded, rel=1e-9):
    rel_f, max_abs = errors(delta, decoded)
    assert info.rel_frobenius == pytest.approx(rel_f, rel=rel, abs=1e-12)
    assert info.max_abs == pytest.approx(max_abs, rel=rel, abs=1e-12)


def f32(x):
    return float(np.float32(x))


# --- parameters ---------------------------------------------------------------------------------------------

def test_defaults_and_names():
    assert params({}).encoding == FALLBACK == "exact"
    assert params(None).encoding == "exact"
    assert params("sparse").density == 0.1
    low = params({"encoding": "lowrank"})
    assert (low.rank, low.energy, low.power_iterations, low.seed) == (64, None, 1, 0)
    assert params({"encoding": "lowrank", "energy": 0.9}).rank is None
    assert params(params({"encoding": "sparse", "density": 0.5})).density == 0.5  # a model is read as its fields
    assert set(ENCODINGS) == {"exact", "bf16", "int8", "sign", "sparse", "lowrank"}


@pytest.mark.parametrize("spec", [
    {"encoding": "sparse", "density": 0}, {"encoding": "sparse", "density": 1.01},
    {"encoding": "sparse", "density": -0.1}, {"encoding": "lowrank", "rank": 0},
    {"encoding": "lowrank", "rank": 4097}, {"encoding": "lowrank", "energy": 0},
    {"encoding": "lowrank", "energy": 1}, {"encoding": "lowrank", "rank": 8, "energy": 0.5},
    {"encoding": "lowrank", "power_iterations": 5}, {"encoding": "lowrank", "seed": -1},
    {"encoding": "exact", "level": 3}, {"encoding": "int8", "density": 0.5}, {"encoding": "zip"},
])
def test_parameters_out_of_range_are_refused(spec):
    with pytest.raises(ValidationError):
        params(spec)


# --- exact --------------------------------------------------------------------------------------------------

def specials(dtype):
    info = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, math.inf, -math.inf, info.tiny, -info.tiny, info.tiny / 2, info.smallest_normal
                         * 2**-20, -info.tiny * 2**-10, info.max, -info.max, info.eps, 1.0, -1.0], dtype=dtype)


@pytest.mark.parametrize("dtype, itype", [(torch.float32, torch.int32), (torch.float64, torch.int64)])
def test_exact_gives_back_the_bits(dtype, itype):
    n = 2 * EXACT_FRAME + 12345
    delta = bf16_delta((n,), seed=1, dtype=dtype)
    delta[1000:1014] = specials(dtype)
    delta[EXACT_FRAME - 7:EXACT_FRAME + 7] = specials(dtype)  # across a frame's edge
    parts, info = encode("exact", delta, chunk=100_003)
    assert (info.rel_frobenius, info.max_abs) == (0.0, 0.0)
    assert info.meta["dtype"] == ("F32" if dtype == torch.float32 else "F64")
    assert parts.tensor("offsets").numel() == 4 and parts.dtypes == {"frames": "U8", "offsets": "I64"}
    full = decode("exact", parts, info, delta.shape, dtype=dtype)
    assert torch.equal(full.view(itype), delta.view(itype))
    for start, count in ((0, 1), (999, 17), (EXACT_FRAME - 5, 11), (7, n - 7), (n - 3, 3), (EXACT_FRAME * 2 + 1, 99)):
        assert torch.equal(decode("exact", parts, info, delta.shape, start, count, dtype).view(itype),
                           delta[start:start + count].view(itype))


def readme_exact_reader(parts, meta, n):
    """The exact encoding's frames decoded as README.md's format section states them, with zstandard and numpy
    alone: an independent reader, against which the encoder's layout is checked."""
    import zstandard

    offsets, frames = parts.tensor("offsets").tolist(), bytes(parts.data["frames"])
    words = []
    for k in range(len(offsets) - 1):
        stored = frames[offsets[k]:offsets[k + 1]]
        m = min(meta["frame"], n - k * meta["frame"])
        kind, data = (stored[0], stored[1:]) if meta.get("layout", 1) >= 2 else (0, stored)
        raw = zstandard.ZstdDecompressor().decompress(data)
        if kind == 0:
            planes = np.frombuffer(raw, np.uint8).reshape(4, m).astype(np.uint32)
            words.append(planes[0] | planes[1] << 8 | planes[2] << 16 | planes[3] << 24)
            continue
        assert kind == 1
        b2, b3 = (np.frombuffer(raw, np.uint8, count=m, offset=i * m).astype(np.uint32) for i in (0, 1))
        word = b3 << 24 | b2 << 16
        e = int.from_bytes(raw[2 * m:2 * m + 4], "little")
        at = np.frombuffer(raw, "<u4", count=e, offset=2 * m + 4)
        word[at] |= np.frombuffer(raw, "<u2", count=e, offset=2 * m + 4 + 4 * e)
        words.append(word)
    return torch.from_numpy(np.concatenate(words).view(np.int32))


def frame_kinds(parts):
    frames = bytes(parts.data["frames"])
    return [frames[o] for o in parts.tensor("offsets").tolist()[:-1]]


def test_exact_stores_high_halves_and_their_exceptions():
    """Layout 2: a bf16 fine-tune's frame keeps the high halves plus the few elements whose low half is not
    zero; a frame of full float32 deltas keeps its four planes. Every bit comes back, signalling NaN payloads
    included (in the high half, the low half, both), and the layout is the one README.md states."""
    n = 3 * EXACT_FRAME + 777
    delta = bf16_delta((n,), seed=11)
    delta[EXACT_FRAME:2 * EXACT_FRAME] = torch.randn(EXACT_FRAME, generator=torch.Generator().manual_seed(3))
    nan_bits = torch.tensor([0x7F800001, 0x7F810000, 0xFF812345 - (1 << 32), 0x7FC00000, 0x00000001,
                             0x80000000 - (1 << 32)], dtype=torch.int32)
    delta.view(torch.int32)[5:11] = nan_bits  # in a high-halves frame: exceptions where the low half is set
    delta.view(torch.int32)[2 * EXACT_FRAME + 3:2 * EXACT_FRAME + 9] = nan_bits
    parts, info = encode("exact", delta, chunk=77_777)
    assert info.meta["layout"] == 2 and frame_kinds(parts) == [1, 0, 1, 1]
    bits = delta.view(torch.int32)
    assert torch.equal(readme_exact_reader(parts, info.meta, n), bits)
    assert torch.equal(decode("exact", parts, info, delta.shape).view(torch.int32), bits)
    for start, count in ((0, 11), (4, 3), (EXACT_FRAME - 2, 5), (2 * EXACT_FRAME + 4, 1), (3 * EXACT_FRAME, 777)):
        got = decode("exact", parts, info, delta.shape, start, count).view(torch.int32)
        assert torch.equal(got, bits[start:start + count])
    wide = decode("exact", parts, info, delta.shape, 0, EXACT_FRAME, torch.float64)
    finite = torch.isfinite(delta[:EXACT_FRAME])
    assert torch.equal(wide[finite], delta[:EXACT_FRAME][finite].double())


def test_exact_reads_artifacts_of_layout_1():
    """An artifact written before layout 2 (meta without `layout`, frames of zstd'd planes without a kind byte)
    decodes as it did: its frames built here by the README's description of layout 1."""
    import zstandard

    n = EXACT_FRAME + 1000
    delta = bf16_delta((n,), seed=12)
    delta[17] = -0.0
    parts = MemoryParts()
    frames, offsets = parts.part("frames", "U8"), [0]
    for k in range(0, n, EXACT_FRAME):
        grid = delta[k:k + EXACT_FRAME].numpy().view(np.uint8).reshape(-1, 4)
        data = zstandard.ZstdCompressor(level=1).compress(np.ascontiguousarray(grid.T).tobytes())
        frames.write(data)
        offsets.append(offsets[-1] + len(data))
    parts.part("offsets", "I64").write(np.asarray(offsets, dtype="<i8").tobytes())
    meta = {"dtype": "F32", "frame": EXACT_FRAME}
    out = torch.full((n,), math.nan)
    ENCODINGS["exact"].decode_into(parts, meta, (n,), 0, out)
    assert torch.equal(out.view(torch.int32), delta.view(torch.int32))
    part = torch.full((30,), math.nan)
    ENCODINGS["exact"].decode_into(parts, meta, (n,), EXACT_FRAME - 10, part)
    assert torch.equal(part, delta[EXACT_FRAME - 10:EXACT_FRAME + 20])


def _spoilt(parts, info, n, edit):
    """The exact parts of a small delta with frame 0's decompressed payload changed by `edit` (recompressed)."""
    import zstandard

    stored = bytes(parts.data["frames"])
    raw = bytearray(zstandard.ZstdDecompressor().decompress(stored[1:]))
    kind, raw = edit(stored[0], raw)
    data = bytes([kind]) + zstandard.ZstdCompressor().compress(bytes(raw))
    bad = MemoryParts()
    bad.part("frames", "U8").write(data)
    bad.part("offsets", "I64").write(np.asarray([0, len(data)], dtype="<i8").tobytes())
    return bad


def test_a_frame_declaring_a_huge_size_is_refused_before_anything_is_allocated():
    """A few bytes of zstd can declare any content size: the declared size is checked against what the frame's
    elements hold before the decompressor allocates it."""
    import zstandard

    from worker.engine.errors import GraftError

    n = 5000
    parts, info = encode("exact", bf16_delta((n,), seed=14))
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))  # 256 MiB of zeros in a few KB
    for kind in (0, 1):
        bad = MemoryParts()
        bad.part("frames", "U8").write(bytes([kind]) + bomb)
        bad.part("offsets", "I64").write(np.asarray([0, len(bomb) + 1], dtype="<i8").tobytes())
        with pytest.raises(GraftError, match="declares") as err:
            ENCODINGS["exact"].decode_into(bad, info.meta, (n,), 0, torch.empty(n))
        assert err.value.code == "invalid_diff"


@pytest.mark.parametrize("meta", [{"frame": 0}, {"frame": -1}, {"frame": None}, {"dtype": "F16"}, {"layout": "2"},
                                  {"layout": 3}, {"layout": None}])
def test_exact_meta_out_of_its_range_is_refused(meta):
    from worker.engine.errors import GraftError

    n = 5000
    parts, info = encode("exact", bf16_delta((n,), seed=15))
    with pytest.raises(GraftError) as err:
        ENCODINGS["exact"].decode_into(parts, {**info.meta, **meta}, (n,), 0, torch.empty(n))
    assert err.value.code == "invalid_diff"


@pytest.mark.parametrize("edit, why", [
    (lambda kind, raw: (7, raw), "unknown kind"),
    (lambda kind, raw: (kind, raw[:-2]), "do not add up"),
    (lambda kind, raw: (kind, raw[:100]), "declares"),  # shorter than its elements
    (lambda kind, raw: (0, raw), "declares"),  # a kind-1 payload's length is not four planes
    (lambda kind, raw: (kind, raw[:2 * 5000 + 4] + (2**31).to_bytes(4, "little") + raw[2 * 5000 + 8:]),
     "not ascending"),
])
def test_a_malformed_exact_frame_is_refused(edit, why):
    from worker.engine.errors import GraftError

    n = 5000
    delta = bf16_delta((n,), seed=13)
    delta.view(torch.int32)[[3, 9]] |= 1  # two exceptions
    parts, info = encode("exact", delta)
    assert frame_kinds(parts) == [1]
    bad = _spoilt(parts, info, n, edit)
    with pytest.raises(GraftError, match=why) as err:
        ENCODINGS["exact"].decode_into(bad, info.meta, (n,), 0, torch.empty(n))
    assert err.value.code == "invalid_diff"


def test_exact_reads_only_the_frames_it_needs():
    n = 3 * EXACT_FRAME
    delta = bf16_delta((n,), seed=2)
    parts, info = encode("exact", delta)
    offsets = parts.tensor("offsets").tolist()
    parts.reads.clear()
    out = decode("exact", parts, info, delta.shape, EXACT_FRAME + 10, 50)
    assert torch.equal(out, delta[EXACT_FRAME + 10:EXACT_FRAME + 60])
    assert parts.reads == [("offsets", 8, 16), ("frames", offsets[1], offsets[2] - offsets[1])]


def test_exact_compresses_a_fine_tunes_delta():
    """Below the fine-tune's own bf16 bytes: shuffled planes of a difference of two bf16 tensors."""
    delta = bf16_delta((EXACT_FRAME,), seed=3)
    parts, info = encode("exact", delta)
    assert parts.nbytes("frames") < 0.5 * 2 * delta.numel()
    assert info.extra["compression"] > 4  # against the float32 delta


# --- bf16 ---------------------------------------------------------------------------------------------------

def bf16_reference(x):
    """Round to nearest even at bf16's 8 significant bits, from the float64 value (once), subnormals at bf16's
    (float32's) smallest exponent."""
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)
    e = np.maximum(e, -125)  # below float32's normals the step stays 2**-133
    return np.ldexp(np.rint(np.ldexp(x, 8 - e)), e - 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_rounds_once_to_nearest_even(dtype):
    delta = bf16_delta((37, 53), seed=4, dtype=dtype) * 3.3 + torch.randn(37, 53, dtype=dtype) * 1e-6
    flat = delta.view(-1)
    flat[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2**-130, -(2**-140)], dtype=dtype)  # ties, subnormals
    if dtype == torch.float64:
        flat[4] = 1 + 2**-8 + 2**-40  # past a tie by less than float32 resolves: rounding twice lands on it
    parts, info = encode("bf16", delta, chunk=333)
    decoded = decode("bf16", parts, info, delta.shape, dtype=dtype)
    expected = bf16_reference(delta.numpy().reshape(-1))
    assert np.array_equal(decoded.numpy(), expected)
    if dtype == torch.float64:
        assert decoded[4] == 1 + 2**-7
    assert_errors(info, delta, decoded)
    assert torch.equal(decode("bf16", parts, info, delta.shape, 101, 555, dtype), decoded[101:656])


# --- int8 ---------------------------------------------------------------------------------------------------

def int8_reference(d):
    """(codes, float32 scales, the float32 decode) of a matrix, per row, in float64."""
    d = np.asarray(d, dtype=np.float64).reshape(d.shape[0], -1)
    scale = (np.abs(d).max(axis=1) / 127).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1).astype(np.float64)
    q = np.clip(np.rint(d / divisor[:, None]), -127, 127).astype(np.int8)
    return q, scale, q.astype(np.float32) * scale[:, None]


def test_int8_quantises_each_row():
    delta = bf16_delta((23, 4, 7), seed=5)
    delta[3] = 0  # a zero row
    delta[5, 0, 0] = 1.0  # a row with an outlier
    parts, info = encode("int8", delta, chunk=100)
    q, scale, expected = int8_reference(delta.numpy())
    assert np.array_equal(parts.tensor("q").numpy(), q.reshape(-1))
    assert np.array_equal(parts.tensor("scale").numpy(), scale)
    decoded = decode("int8", parts, info, delta.shape)
    assert np.array_equal(decoded.numpy(), expected.reshape(-1))
    assert_errors(info, delta, decoded)
    assert info.extra["zero_rows"] == 1
    for start, count in ((0, 1), (27, 1), (27, 29), (13, 600), (643, 1)):
        assert torch.equal(decode("int8", parts, info, delta.shape, start, count), decoded[start:start + count])


def test_int8_in_float64():
    delta = bf16_delta((9, 31), seed=6, dtype=torch.float64)
    parts, info = encode("int8", delta)
    q, scale, _ = int8_reference(delta.numpy())
    decoded = decode("int8", parts, info, delta.shape, dtype=torch.float64)
    assert np.array_equal(decoded.numpy(), (q.astype(np.float64) * scale.astype(np.float64)[:, None]).reshape(-1))
    assert_errors(info, delta, decoded)


# --- sign ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_keeps_signs_and_the_mean_magnitude(dtype):
    delta = bf16_delta((61, 47), seed=7, dtype=dtype)  # a bf16 fine-tune: many exact zeros
    d = delta.numpy().reshape(-1).astype(np.float64)
    zeros = d == 0
    assert zeros.sum() > 200
    parts, info = encode("sign", delta, chunk=1001)
    scale = f32(np.abs(d).mean())
    assert info.meta["scale"] == scale
    decoded = decode("sign", parts, info, delta.shape, dtype=dtype).numpy()
    assert np.array_equal(decoded[~zeros], np.sign(d[~zeros]) * scale)
    assert np.array_equal(np.abs(decoded[zeros]), np.full(zeros.sum(), scale))
    assert abs(np.sign(decoded[zeros]).mean()) < 0.1  # the zeros' signs are spread, no shift of the mean
    # For the signs it chose, mean |d| is the L2-best scale: (s . d) / n.
    s = np.sign(decoded)
    assert scale == pytest.approx(s @ d / d.size, rel=1e-6)
    assert_errors(info, delta, decoded)
    assert info.extra["zeros"] == zeros.sum()
    assert parts.nbytes("bits") == math.ceil(d.size / 8)
    for start, count in ((0, 1), (3, 5), (9, 1000), (2860, 7)):
        assert np.array_equal(decode("sign", parts, info, delta.shape, start, count, dtype).numpy(),
                              decoded[start:start + count])


# --- sparse -------------------------------------------------------------------------------------------------

def sparse_reference(d, k):
    """The k largest |d| (ties: lower index first, by a stable sort), less the zeros; sign * mean |kept|."""
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    kept = np.argsort(-np.abs(d), kind="stable")[:k]
    kept = np.sort(kept[d[kept] != 0])
    scale = f32(np.abs(d[kept]).mean()) if kept.size else 0.0
    out = np.zeros_like(d)
    out[kept] = np.sign(d[kept]) * scale
    return kept, scale, out


def sparse_case(shape, density, seed, dtype=torch.float32, chunk=None, ties=False):
    delta = bf16_delta(shape, seed=seed, dtype=dtype)
    if ties:  # few magnitudes: the threshold cuts through a run of equal values
        delta = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).to(dtype) * 0.25
    parts, info = encode("sparse", delta, {"encoding": "sparse", "density": density}, chunk=chunk)
    k = math.ceil(round(density * delta.numel(), 9))
    kept, scale, expected = sparse_reference(delta.numpy(), k)
    decoded = decode("sparse", parts, info, delta.shape, dtype=dtype)
    assert np.array_equal(decoded.numpy(), expected)
    assert info.meta["scale"] == scale and info.meta["stored"] == kept.size == info.extra["stored"]
    assert info.extra["k"] == k
    assert_errors(info, delta, decoded)
    return delta, parts, info, decoded


@pytest.mark.parametrize("density", [0.1, 0.37, 1.0])
def test_sparse_keeps_the_top_k(density):
    sparse_case((3 * SPARSE_FRAME + 77,), density, seed=8, chunk=40_000)


def test_sparse_ties_keep_the_lowest_indices():
    _, _, info, _ = sparse_case((50, 41), 0.3, seed=9, ties=True, chunk=333)
    assert info.extra["threshold"] == 0.5  # inside the run of |d| = 0.5: some kept, some not


def test_sparse_in_float64_and_small_densities():
    sparse_case((45, 17), 0.05, seed=10, dtype=torch.float64)
    sparse_case((10,), 0.7, seed=11)  # k = 7, not ceil(7.000000000000001)
    _, _, info, _ = sparse_case((10,), 0.7, seed=11)
    assert info.extra["k"] == 7


def test_sparse_range_decode_reads_its_frames():
    delta, parts, info, decoded = sparse_case((4 * SPARSE_FRAME + 5,), 0.2, seed=12)
    counts = parts.tensor("counts").tolist()
    parts.reads.clear()
    start, count = 2 * SPARSE_FRAME + 100, 3000
    assert torch.equal(decode("sparse", parts, info, delta.shape, start, count), decoded[start:start + count])
    assert parts.reads == [("counts", 16, 16), ("entries", 2 * counts[2], 2 * (counts[3] - counts[2]))]
    for start, count in ((0, 1), (SPARSE_FRAME - 3, 9), (5, 4 * SPARSE_FRAME), (4 * SPARSE_FRAME + 4, 1)):
        assert torch.equal(decode("sparse", parts, info, delta.shape, start, count), decoded[start:start + count])


# --- lowrank ------------------------------------------------------------------------------------------------

def spectrum_matrix(m, n, sigma, seed, dtype=torch.float32):
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((m, len(sigma))))
    v, _ = np.linalg.qr(g.standard_normal((n, len(sigma))))
    return torch.tensor((u * sigma) @ v.T, dtype=dtype)


SIGMA = np.concatenate([[10, 8, 6, 5, 4, 3, 2.5, 2], 0.5 * 0.9 ** np.arange(60)]) * 1e-3


def best_error(a, r):
    """||A - A_r|| / ||A|| for numpy's float64 SVD truncated at r, and A_r."""
    a = np.asarray(a, dtype=np.float64)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return math.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()), (u[:, :r] * s[:r]) @ vt[:r], s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowrank_against_numpys_svd(dtype):
    a = spectrum_matrix(120, 90, SIGMA, seed=13, dtype=dtype)
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "rank": 8}, chunk=1000)
    optimum, a_r, _ = best_error(a.numpy(), 8)
    decoded = decode("lowrank", parts, info, a.shape, dtype=dtype)
    rel_f, max_abs = errors(a.numpy(), decoded.numpy())
    # One power iteration: the sketch's error on the top-8 subspace contracts by (s_17 / s_8)^3 ~ (0.46/2)^3, so
    # the randomized result is within a fraction of a percent of the optimum; 2 % leaves room for the seed.
    assert optimum * (1 - 1e-5) <= rel_f <= optimum * 1.02
    assert np.linalg.norm(decoded.numpy().reshape(a.shape) - a_r) <= 0.02 * np.linalg.norm(a_r)
    assert info.rel_frobenius == pytest.approx(rel_f, rel=1e-4)  # the encoder's rebuild, in blocks
    assert info.max_abs == pytest.approx(max_abs, rel=1e-4)
    assert info.extra["retained_energy"] == pytest.approx(1 - rel_f**2, abs=1e-5)  # ||A-UV||^2 = ||A||^2 - sum s^2
    assert parts.tensor("U").numel() == 120 * 8 and parts.tensor("V").numel() == 8 * 90
    for start, count in ((0, 1), (89, 2), (91, 500), (10799, 1), (1234, 5678)):
        part = decode("lowrank", parts, info, a.shape, start, count, dtype)
        assert torch.allclose(part, decoded[start:start + count], rtol=1e-5, atol=1e-9)  # matmuls of other rows


def test_lowrank_without_power_iterations_stays_within_halkos_bound():
    a = spectrum_matrix(100, 80, SIGMA, seed=14)
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "rank": 8, "power_iterations": 0})
    optimum, _, _ = best_error(a.numpy(), 8)
    rel_f, _ = errors(a.numpy(), decode("lowrank", parts, info, a.shape).numpy())
    # Halko et al. (2011) theorem 10.5: E||A - QQ*A|| <= (1 + r / (p - 1))^(1/2) * the optimum, p = 8.
    assert rel_f <= math.sqrt(1 + 8 / 7) * optimum
    assert info.rel_frobenius == pytest.approx(rel_f, rel=1e-4)


def test_lowrank_energy_picks_the_smallest_rank_reaching_it():
    a = spectrum_matrix(150, 110, SIGMA, seed=15)
    _, _, s = best_error(a.numpy(), 1)
    share = np.cumsum(s**2) / (s**2).sum()
    energy = float((share[5] + share[6]) / 2)  # rank 7 reaches it with a margin either side
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "energy": energy})
    assert info.meta["rank"] == info.extra["rank"] == 7
    assert info.extra["retained_energy"] == pytest.approx(share[6], rel=1e-4)
    assert parts.tensor("V").numel() == 7 * 110


def test_lowrank_exactly_low_rank_and_zero():
    a = spectrum_matrix(64, 70, np.array([3.0, 2.0, 1.0]), seed=16)
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "rank": 3})
    assert info.rel_frobenius < 1e-5
    zero = torch.zeros(64, 70)
    for spec in ({"encoding": "lowrank", "rank": 3}, {"encoding": "lowrank", "energy": 0.5}):
        parts, info = encode("lowrank", zero, spec)
        assert (info.rel_frobenius, info.max_abs) == (0.0, 0.0)
        assert torch.equal(decode("lowrank", parts, info, zero.shape), zero.view(-1))
    assert info.meta["rank"] == 0


def test_lowrank_hands_to_exact_where_it_saves_nothing():
    a = spectrum_matrix(16, 16, np.array([1.0]), seed=17)
    assert ENCODINGS["lowrank"].applies_to((16, 16)) and not ENCODINGS["lowrank"].applies_to((256,))
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "rank": 4})  # 4 * 32 >= 256 / 2
    assert info.meta["stored"] == info.extra["stored"] == "exact" and set(parts.data) == {"frames", "offsets"}
    assert torch.equal(decode("lowrank", parts, info, a.shape), a.view(-1))
    parts, info = encode("lowrank", a, {"encoding": "lowrank", "rank": 3})  # 3 * 32 < 128: saves
    assert info.meta == {"rank": 3}


# --- every encoding -----------------------------------------------------------------------------------------

LOSSY = [("bf16", "bf16"), ("int8", "int8"), ("sign", "sign"), ("sparse", {"encoding": "sparse", "density": 0.2}),
         ("lowrank", {"encoding": "lowrank", "rank": 6})]
ALL = [("exact", "exact"), *LOSSY]


@pytest.mark.parametrize("name, spec", ALL)
def test_the_chunk_cut_changes_nothing(name, spec):
    delta = bf16_delta((70, 33), seed=18)
    runs = [encode(name, delta, spec, chunk=c) for c in (None, 13, 7 * 33, 1000)]
    first_parts, first_info = runs[0]
    for parts, info in runs[1:]:
        assert parts.data == first_parts.data and parts.dtypes == first_parts.dtypes
        assert (info.meta, info.rel_frobenius, info.max_abs, info.extra) == \
               (first_info.meta, first_info.rel_frobenius, first_info.max_abs, first_info.extra)


@pytest.mark.parametrize("name, spec", ALL)
def test_a_zero_delta_decodes_to_zero(name, spec):
    delta = torch.zeros(40, 30)
    parts, info = encode(name, delta, spec)
    assert (info.rel_frobenius, info.max_abs) == (0.0, 0.0)
    assert torch.equal(decode(name, parts, info, delta.shape), delta.view(-1))


@pytest.mark.parametrize("name, spec", ALL)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
def test_an_empty_tensor(name, spec, shape):
    delta = torch.zeros(shape)
    if name in ("int8", "sign", "lowrank"):
        assert not ENCODINGS[name].applies_to(shape)
    parts, info = encode(name, delta, spec)
    assert (info.rel_frobenius, info.max_abs) == (0.0, 0.0)
    assert decode(name, parts, info, shape).numel() == 0


@pytest.mark.parametrize("name, spec", [s for s in ALL if s[0] in ("int8", "sign", "lowrank")])
def test_vectors_are_not_matrices(name, spec):
    delta = bf16_delta((300,), seed=19)
    assert not ENCODINGS[name].applies_to((300,))
    parts, info = encode(name, delta, spec)  # handed to exact by the encoding itself
    assert info.meta["stored"] == "exact"
    assert torch.equal(decode(name, parts, info, delta.shape), delta)


@pytest.mark.parametrize("name, spec", LOSSY)
def test_decode_into_float64_of_a_float32_encoding(name, spec):
    delta = bf16_delta((30, 20), seed=20)
    parts, info = encode(name, delta, spec)
    wide = decode(name, parts, info, delta.shape, dtype=torch.float64)
    assert torch.allclose(wide, decode(name, parts, info, delta.shape).double(), rtol=1e-6, atol=1e-12)


def test_decoders_run_in_several_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    delta = bf16_delta((3 * EXACT_FRAME,), seed=21)
    parts, info = encode("exact", delta)
    ranges = [(s, 70_001) for s in range(0, 3 * EXACT_FRAME - 70_001, 50_000)] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda r: decode("exact", parts, info, delta.shape, *r), ranges))
    assert all(torch.equal(g, delta[s:s + c]) for g, (s, c) in zip(got, ranges, strict=True))
