"""The arithmetic: every element within 1 ulp of a float64 reference, dtype overrides, better than naive
bfloat16 arithmetic, and tensors matched by name whatever the sharding and order."""

from __future__ import annotations

import os

import pytest
import torch
from graft_helpers import (
    EMBED,
    HEAD,
    ROLES,
    assert_matches_expected,
    correctly_rounded,
    expected_output,
    graft,
    load_dir,
    read_json,
    reference,
    ulp_error,
)

from worker.devtools.sample_models import LlamaShape, chat_tokenizer_files, llama_state, perturb, save_checkpoint


@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.75])
def test_every_element_within_one_ulp_of_float64_reference(trio, tmp_path, alpha):
    result, _ = graft(trio, tmp_path / "out", alpha=alpha)
    out = load_dir(str(tmp_path / "out"))
    expected, tied = expected_output(trio, alpha=alpha)
    assert not tied
    assert_matches_expected(out, expected, max_ulp=1.0)
    # Mixed dtypes are kept: bf16 matrices, fp32 norms.
    assert out[EMBED].dtype == torch.bfloat16
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert out["model.norm.weight"].dtype == torch.float32
    assert out["model.layers.1.input_layernorm.weight"].dtype == torch.float32
    assert result.manifest["options"]["alpha"] == alpha


def test_alpha_zero_reproduces_target_on_shared_rows(trio, tmp_path):
    graft(trio, tmp_path / "out", alpha=0.0)
    out = load_dir(str(tmp_path / "out"))
    target = load_dir(trio["target_base"])
    for name, t in target.items():
        assert torch.equal(out[name][: t.shape[0]], t), name


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32), ("float16", torch.float16),
                                               ("bfloat16", torch.bfloat16)])
def test_dtype_override(trio, tmp_path, dtype, torch_dtype):
    graft(trio, tmp_path / "out", dtype=dtype)
    out = load_dir(str(tmp_path / "out"))
    for name, t in out.items():
        assert t.dtype == torch_dtype, name
    expected, _ = expected_output(trio)
    assert_matches_expected(out, expected, max_ulp=1.0)
    config = read_json(str(tmp_path / "out" / "config.json"))
    assert config.get("torch_dtype", config.get("dtype")) == dtype


def test_beats_naive_bfloat16_arithmetic(tmp_path):
    """With realistic fine-tuning deltas (about 1e-3 of the weights, near one bfloat16 step) computing
    the weighted sum of a linear merge in bf16, (t + f) - s, rounds at every step and gets many elements
    wrong; the engine rounds once, so (almost) every element is the correctly rounded reference."""
    shape = LlamaShape()
    base = llama_state(shape, seed=10)
    states = {"source_base": base, "source_finetuned": perturb(base, seed=11, scale=0.004),
              "target_base": perturb(base, seed=12, scale=0.2)}
    paths = {role: save_checkpoint(str(tmp_path / role), st, shape.config()) for role, st in states.items()}
    graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    s_state, f_state, t_state = (load_dir(paths[r]) for r in ROLES)
    engine_wrong = naive_wrong = total = 0
    worst_engine = worst_naive = 0.0
    for name, t in t_state.items():
        if t.dtype != torch.bfloat16:
            continue
        s, f = s_state[name], f_state[name]
        ref = reference(t, s, f, 1.0)
        exact = correctly_rounded(ref, torch.bfloat16)
        naive = (t + f) - s  # bf16 throughout, as a [1, 1, -1] linear merge computes it
        engine_wrong += int((out[name] != exact).sum())
        naive_wrong += int((naive != exact).sum())
        worst_engine = max(worst_engine, float(ulp_error(out[name], ref).max()))
        worst_naive = max(worst_naive, float(ulp_error(naive, ref).max()))
        total += t.numel()
    assert total > 100_000
    assert engine_wrong <= total * 1e-4, (engine_wrong, total)
    assert worst_engine <= 0.5 + 1e-9
    assert naive_wrong >= total * 0.05, (naive_wrong, total)
    assert worst_naive > 1.0


def _write_variant(root, *, shards: dict[str, int], reverse: dict[str, bool]) -> dict[str, str]:
    """The same three models as make_trio(seed=0) writes, split and ordered differently."""
    shape = LlamaShape()
    base = llama_state(shape, seed=0, tied=False)
    finetuned = perturb(base, seed=1, scale=0.05, extra_rows=8, tied=False)
    target = perturb(base, seed=2, scale=0.2, tied=False)
    target["model.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    paths = {}
    for role, state, vocab in (("source_base", base, 256), ("source_finetuned", finetuned, 264),
                               ("target_base", target, 256)):
        paths[role] = save_checkpoint(os.path.join(str(root), role), state, shape.config(vocab=vocab, tied=False),
                                      shards=shards[role], reverse=reverse[role],
                                      tokenizer=chat_tokenizer_files(role))
    return paths


@pytest.mark.parametrize("shards,reverse", [
    ({"source_base": 3, "source_finetuned": 1, "target_base": 2},
     {"source_base": True, "source_finetuned": True, "target_base": False}),
    ({"source_base": 5, "source_finetuned": 4, "target_base": 1},
     {"source_base": False, "source_finetuned": True, "target_base": True}),
])
def test_tensors_matched_by_name_across_shardings(trio, tmp_path, shards, reverse):
    graft(trio, tmp_path / "reference_out")
    variant = _write_variant(tmp_path / "variant", shards=shards, reverse=reverse)
    for role in ROLES:  # the inputs really are laid out differently
        assert sorted(os.listdir(variant[role])) != sorted(os.listdir(trio[role])) or reverse[role]
    graft(variant, tmp_path / "variant_out")
    a, b = load_dir(str(tmp_path / "reference_out")), load_dir(str(tmp_path / "variant_out"))
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert HEAD in a
