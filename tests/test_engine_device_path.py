"""The accelerator's whole-piece arithmetic, run on the CPU: it must agree with the chunked CPU path
bit for bit (both accumulate in float32 and round once), and report the same statistics."""

from __future__ import annotations

import pytest
import torch

from worker.engine.compute.arithmetic import CHUNK, Arithmetic, TensorStats


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_whole_piece_path_matches_chunked_path(alpha, out_dtype):
    g = torch.Generator().manual_seed(7)
    n = 2 * CHUNK + 12345  # several chunks and a ragged tail
    s = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    f = (s.float() + torch.randn(n, generator=g) * 2e-4).to(torch.bfloat16)
    t = (s.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
    results = []
    for whole in (False, True):
        out = torch.empty(n, dtype=out_dtype)
        stats = TensorStats()
        Arithmetic(torch.device("cpu"), whole_pieces=whole).transfer(out, t, s, f, alpha, torch.float32, stats)
        results.append((out, stats))
    (chunked, st1), (whole, st2) = results
    assert torch.equal(chunked, whole)
    reference = (t.double() + alpha * (f.double() - s.double())).to(out_dtype)
    # One rounding from float32: all but a rare double-rounding case equal the correctly rounded value.
    assert (chunked != reference).float().mean() < 1e-3
    for name in ("delta_sq", "target_sq", "bases_sq", "cross"):
        assert getattr(st1, name) == pytest.approx(getattr(st2, name), rel=1e-4)
    assert not st1.nonfinite and not st2.nonfinite


def test_whole_piece_path_flags_float16_overflow():
    n = 1000
    t = torch.full((n,), 60000.0, dtype=torch.float32)
    s = torch.zeros(n)
    f = torch.full((n,), 10000.0)
    out = torch.empty(n, dtype=torch.float16)
    stats = TensorStats()
    Arithmetic(torch.device("cpu"), whole_pieces=True).transfer(out, t, s, f, 1.0, torch.float32, stats)
    assert stats.nonfinite


@pytest.mark.parametrize("whole", [False, True])
def test_huge_finite_values_are_not_reported_as_nan_or_inf(whole):
    """Float masks near finfo.min square to Inf in float32; only a real NaN/Inf may fail a graft."""
    n = 1000
    t = torch.full((n,), -3.0e38)
    s = torch.zeros(n)
    f = torch.zeros(n)
    arithmetic = Arithmetic(torch.device("cpu"), whole_pieces=whole)
    out, stats = torch.empty(n), TensorStats()
    arithmetic.transfer(out, t, s, f, 1.0, torch.float32, stats)
    assert not stats.nonfinite and torch.equal(out, t)
    stats = TensorStats()
    arithmetic.copy(out, t, True, stats)
    assert not stats.nonfinite
    f[3] = float("nan")
    stats = TensorStats()
    arithmetic.transfer(out, t, s, f, 1.0, torch.float32, stats)
    assert stats.nonfinite
