"""The structure-aware apply of a diff artifact (worker/engine/compute/patches.py, Arithmetic.apply_patch): a
sparse delta patched onto the target's values, a low-rank one formed U V chunk by chunk in the kernel, a bf16
one widened as read. Each writes the bytes the dense kernel writes from the decoded delta (what an apply wrote
before), and those are the float64 reference (target + alpha x the delta decoded here from the raw parts) with
the kernels' roundings; chunked and whole, odd shapes and ranges, alpha != 1, -0.0 and non-finite targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.compute.arithmetic import CHUNK, Arithmetic
from worker.engine.compute.tensor_stats import TensorStats
from worker.engine.diffs.encoding_params import LowRankParams, SparseParams
from worker.engine.diffs.encodings import ENCODINGS
from worker.engine.diffs.encodings.memory_parts import MemoryParts

SHAPE = (611, 977)  # 596,947 elements: two CPU chunks and a part, rows that do not divide a chunk


def _encode(name: str, params, delta: torch.Tensor) -> tuple[MemoryParts, dict]:
    parts = MemoryParts()
    enc = ENCODINGS[name].encoder(tuple(delta.shape), torch.float32, params, parts)
    for p in range(enc.passes):
        flat = delta.reshape(-1)
        for i in range(0, flat.numel(), 100_003):
            enc.feed(p, i, flat[i:i + 100_003])
        enc.end_pass(p)
    return parts, enc.finish().meta


def _sparse_reference(parts: MemoryParts, meta: dict, n: int) -> np.ndarray:
    """The sparse parts decoded in float64 from their documented layout (README: U16 entries by frame)."""
    entries = parts.tensor("entries").numpy().astype(np.int64) & 0xFFFF
    counts = parts.tensor("counts").numpy()
    frames = np.repeat(np.arange(len(counts) - 1), np.diff(counts))
    where = frames * meta["frame"] + (entries & 0x7FFF)
    out = np.zeros(n)
    out[where] = np.where(entries >> 15, -1.0, 1.0) * meta["scale"]
    return out


def _lowrank_reference(parts: MemoryParts, meta: dict, shape) -> np.ndarray:
    r = meta["rank"]
    u = parts.tensor("U").double().numpy().reshape(shape[0], r)
    v = parts.tensor("V").double().numpy().reshape(r, -1)
    return (u @ v).reshape(-1)


def _delta(g: torch.Generator) -> torch.Tensor:
    u, v = torch.randn(SHAPE[0], 6, generator=g), torch.randn(6, SHAPE[1], generator=g)
    return (u @ v * 1e-4 + torch.randn(*SHAPE, generator=g) * 1e-5).float()


def _target(g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    t = (torch.randn(SHAPE[0] * SHAPE[1], generator=g) * 0.02).to(dtype)
    t[::1013] = -0.0  # the dense kernel makes +0.0 of -0.0 + 0 (alpha >= 0): the patch must too
    t[5] = 0.0
    return t


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _applied(kernel: Arithmetic, t: torch.Tensor, patch_or_dense, alpha: float, dense: bool):
    out, stats = torch.empty_like(t), TensorStats()
    if dense:
        kernel.apply_delta(out, t, patch_or_dense, alpha, torch.float32, stats)
    else:
        kernel.apply_patch(out, t, patch_or_dense, alpha, torch.float32, stats)
    return out, stats


CASES = [("sparse", SparseParams(encoding="sparse", density=0.07)),
         ("lowrank", LowRankParams(encoding="lowrank", rank=5)), ("bf16", None)]


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alpha", [0.7, -1.3, 1.0])
@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_a_patch_writes_the_dense_kernels_bytes_and_the_float64_reference(name, params, alpha, dtype, whole):
    g = torch.Generator().manual_seed(11)
    delta = _delta(g)
    parts, meta = _encode(name, params or ENCODINGS[name].Params(encoding=name), delta)
    t = _target(g, dtype)
    n = t.numel()
    encoding = ENCODINGS[name]
    kernel = Arithmetic(torch.device("cpu"), whole_pieces=whole)
    for start, stop in [(0, n), (12_345, 12_345 + CHUNK + 977 * 3 + 17), (n - 1001, n)]:  # whole, mid-row, tail
        piece = t[start:stop]
        patch = encoding.patch(parts, meta, SHAPE, start, stop - start, torch.float32)
        dense = torch.empty(stop - start)
        encoding.decode_into(parts, meta, SHAPE, start, dense)
        got, stats = _applied(kernel, piece, patch, alpha, dense=False)
        before, before_stats = _applied(kernel, piece, dense.clone(), alpha, dense=True)
        assert torch.equal(_bits(got), _bits(before)), (name, start)
        assert stats.target_sq == before_stats.target_sq
        assert stats.delta_sq == pytest.approx(before_stats.delta_sq, rel=1e-5)
        assert stats.nonfinite == before_stats.nonfinite
        # float64 reference: the delta decoded here, times alpha as float32, added to the target, rounded
        if name == "sparse":
            ref = _sparse_reference(parts, meta, n)[start:stop]
        elif name == "lowrank":
            ref = _lowrank_reference(parts, meta, SHAPE)[start:stop]
        else:
            ref = parts.tensor("values").double().numpy()[start:stop]
        a32 = float(np.float32(alpha))
        expected = piece.double().numpy() + a32 * ref
        got64 = got.double().numpy()
        info = torch.finfo(dtype)
        floor = info.smallest_normal * info.eps  # a subnormal's spacing
        if name == "lowrank":  # U V in float32 by the BLAS: within a float32 rounding of each term
            spread = np.abs(expected) * info.eps + abs(a32) * 1e-6 * np.abs(ref).max() + floor
            assert np.all(np.abs(got64 - expected) <= spread)
        elif not whole:  # alpha x d and t + that each rounded to float32 (as the kernels do), then the stored dtype
            rounded = (piece.double() + torch.from_numpy(a32 * ref).float().double()).float().to(dtype)
            assert torch.equal(_bits(got), _bits(rounded))
        else:
            assert np.all(np.abs(got64 - expected) <= np.abs(expected) * info.eps + floor)


@pytest.mark.parametrize("alpha", [0.5, -0.5])
def test_a_sparse_patch_on_a_non_finite_target_writes_the_dense_bytes(alpha):
    g = torch.Generator().manual_seed(3)
    delta = _delta(g)
    parts, meta = _encode("sparse", SparseParams(encoding="sparse", density=0.2), delta)
    t = (torch.randn(delta.numel(), generator=g) * 0.02).float()
    t[CHUNK + 7] = float("nan")
    t[CHUNK + 9] = float("inf")
    t[3] = -0.0
    patch = ENCODINGS["sparse"].patch(parts, meta, SHAPE, 0, t.numel(), torch.float32)
    dense = torch.empty(t.numel())
    ENCODINGS["sparse"].decode_into(parts, meta, SHAPE, 0, dense)
    kernel = Arithmetic(torch.device("cpu"))
    got, stats = _applied(kernel, t, patch, alpha, dense=False)
    before, before_stats = _applied(kernel, t, dense, alpha, dense=True)
    assert torch.equal(_bits(got), _bits(before))
    assert stats.nonfinite and before_stats.nonfinite


def test_a_float16_overflow_is_reported_by_the_sparse_patch():
    delta = torch.zeros(SHAPE)
    delta.view(-1)[100] = 40_000.0
    parts, meta = _encode("sparse", SparseParams(encoding="sparse", density=0.0001), delta)
    t = torch.full((delta.numel(),), 30_000.0).half()
    patch = ENCODINGS["sparse"].patch(parts, meta, SHAPE, 0, t.numel(), torch.float32)
    got, stats = _applied(Arithmetic(torch.device("cpu")), t, patch, 1.0, dense=False)
    assert stats.nonfinite and torch.isinf(got.float()).sum() >= 1


@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_a_patch_slice_is_the_patch_of_that_range(name, params):
    g = torch.Generator().manual_seed(5)
    parts, meta = _encode(name, params or ENCODINGS[name].Params(encoding=name), _delta(g))
    whole = ENCODINGS[name].patch(parts, meta, SHAPE, 1000, 400_000, torch.float32)
    for lo, hi in [(0, 400_000), (3, 977 * 2 + 5), (250_001, 400_000)]:
        a, b = torch.empty(hi - lo), torch.empty(hi - lo)
        whole.slice(lo, hi).dense_into(0, a)
        ENCODINGS[name].decode_into(parts, meta, SHAPE, 1000 + lo, b)
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("encoding", [{"encoding": "sparse", "density": 0.1}, {"encoding": "lowrank", "rank": 4},
                                      "bf16"], ids=["sparse", "lowrank", "bf16"])
def test_an_applied_artifact_writes_the_bytes_of_the_dense_apply(trio, tmp_path, encoding, monkeypatch,
                                                                 one_torch_thread):
    """End to end (`graft run --diff`): the structured reads are taken for the plain transfers, and the output
    files are byte for byte those of the dense decode (structured reads turned off)."""
    from test_diff_artifacts import apply, extract, same_files

    import worker.engine.compute.stream as stream
    from worker.engine.compute.arithmetic import Arithmetic as Kernel

    extract(trio, tmp_path / "diff", encoding)
    calls = []
    real = Kernel.apply_patch
    monkeypatch.setattr(Kernel, "apply_patch", lambda self, *a: calls.append(1) or real(self, *a))
    apply(str(tmp_path / "diff"), trio["target_base"], tmp_path / "patched", alpha=0.7)
    assert calls  # the structured path ran
    monkeypatch.setattr(stream, "structured_reads", lambda plan, reading: {})
    calls.clear()
    apply(str(tmp_path / "diff"), trio["target_base"], tmp_path / "dense", alpha=0.7)
    assert not calls
    assert same_files(str(tmp_path / "patched"), str(tmp_path / "dense")) == []


@pytest.mark.parametrize("damage", ["swap", "repeat", "counts"])
def test_a_malformed_sparse_encoding_is_refused_not_applied_out_of_place(damage):
    """An artifact comes from a user's URI and its sha256 only says it is what its own manifest lists: entries
    out of order (or repeated) in a frame, or frame counts that go backwards, are invalid_diff, never a patch
    written at the wrong places or an IndexError."""
    from worker.engine.errors import GraftError

    delta = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    parts, meta = _encode("sparse", SparseParams(encoding="sparse", density=0.1), delta)
    entries = parts.data["entries"]
    if damage == "swap":  # the first two entries of the first frame exchanged
        entries[0:2], entries[2:4] = bytes(entries[2:4]), bytes(entries[0:2])
    elif damage == "repeat":
        entries[2:4] = bytes(entries[0:2])
    else:  # the second frame's count below the first's
        counts = parts.data["counts"]
        counts[8:16] = (0).to_bytes(8, "little")
        counts[0:8] = (5).to_bytes(8, "little")
    with pytest.raises(GraftError) as err:
        ENCODINGS["sparse"].patch(parts, meta, SHAPE, 0, delta.numel(), torch.float32)
    assert err.value.code == "invalid_diff" and "malformed" in err.value.message
