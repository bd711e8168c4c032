"""Every tensor accounted for: target-only copied, source-only reported, non-float copied from the target
(with a warning when the fine-tune changed it), shape conflicts, --include/--exclude."""

from __future__ import annotations

import os

import pytest
import torch
from graft_helpers import assert_matches_expected, expected_output, graft, load_dir

from worker.devtools.sample_models import LlamaShape, chat_tokenizer_files, llama_state, perturb, save_checkpoint
from worker.engine import GraftError

Q0 = "model.layers.0.self_attn.q_proj.weight"
BIAS = "model.layers.0.self_attn.q_proj.bias"
IDS = "model.layers.0.position_ids"
MASK = "model.layers.1.attn_mask"
INV = "model.rotary_emb.inv_freq"


def _build(root, *, source_only=False, buffers=False, change_buffer=False, q_shape_conflict=None,
           nan_in=None) -> dict[str, str]:
    shape = LlamaShape()
    base = llama_state(shape, seed=20)
    if buffers:
        base[IDS] = torch.arange(32, dtype=torch.int64)
        base[MASK] = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    ft = perturb(base, seed=21, scale=0.05)
    target = perturb(base, seed=22, scale=0.2)
    target[INV] = torch.linspace(1, 0.01, 8)  # the target's own tensor
    if buffers:
        target[IDS] = torch.arange(32, dtype=torch.int64) + 100  # the target's value is the one kept
        if change_buffer:
            ft[IDS] = torch.arange(32, dtype=torch.int64).flip(0)
    if source_only:
        base[BIAS] = torch.zeros(64, dtype=torch.bfloat16)
        ft[BIAS] = torch.full((64,), 0.5, dtype=torch.bfloat16)
    if q_shape_conflict:
        role_state = {"source_finetuned": ft, "source_base": base, "target_base": target}[q_shape_conflict]
        role_state[Q0] = torch.zeros(32, 64, dtype=torch.bfloat16)
    if nan_in:
        ft[nan_in] = ft[nan_in].clone()
        ft[nan_in].view(-1)[5] = float("nan")
    paths = {}
    for role, state in (("source_base", base), ("source_finetuned", ft), ("target_base", target)):
        paths[role] = save_checkpoint(os.path.join(str(root), role), state, shape.config(),
                                      shards=2 if role == "source_finetuned" else 1,
                                      tokenizer=chat_tokenizer_files(role))
    return paths


def test_target_only_tensor_is_copied_bit_exact(trio, tmp_path):
    result, _ = graft(trio, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    target = load_dir(trio["target_base"])
    assert torch.equal(out[INV], target[INV]) and out[INV].dtype == target[INV].dtype
    assert result.manifest["tensors"][INV]["action"] == "copied"
    assert result.manifest["plan"]["actions"]["copied"] == 1


def test_source_only_tensor_reported_in_manifest_and_warnings(tmp_path):
    paths = _build(tmp_path, source_only=True)
    result, warnings = graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    assert BIAS not in out
    assert result.manifest["source_only"] == [{"tensor": BIAS, "in": ["source_base", "source_finetuned"]}]
    assert [w for w in warnings if w["code"] == "source_only" and w["tensor"] == BIAS]
    assert BIAS not in result.manifest["tensors"]


def test_non_float_tensors_copied_from_target_and_changes_reported(tmp_path):
    paths = _build(tmp_path, buffers=True, change_buffer=True)
    result, _ = graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    target = load_dir(paths["target_base"])
    for name in (IDS, MASK):
        assert out[name].dtype == target[name].dtype and torch.equal(out[name], target[name])
        assert result.manifest["tensors"][name]["action"] == "copied"
    changed = [w for w in result.warnings if w["code"] == "buffer_changed_by_finetune"]
    assert [w["tensor"] for w in changed] == [IDS]  # the mask is unchanged: no warning for it
    assert changed[0] in result.manifest["warnings"]


def test_non_float_unchanged_gives_no_warning(tmp_path):
    paths = _build(tmp_path, buffers=True, change_buffer=False)
    result, _ = graft(paths, tmp_path / "out")
    assert not [w for w in result.warnings if w["code"] == "buffer_changed_by_finetune"]


@pytest.mark.parametrize("target_len", [64, 1 << 20])
def test_non_float_of_another_shape_in_target_is_copied_without_reading_past_the_sources(tmp_path, target_len):
    """The sources' copies of a buffer are compared at the target's element indices: a longer target buffer
    must not read past the sources' tensors (a spurious warning, or past the end of their file)."""
    shape = LlamaShape()
    base = llama_state(shape, seed=20)
    base[IDS] = torch.arange(32, dtype=torch.int64)
    ft = perturb(base, seed=21, scale=0.05)
    target = perturb(base, seed=22, scale=0.2)
    target[IDS] = torch.arange(target_len, dtype=torch.int64) + 100
    paths = {role: save_checkpoint(os.path.join(str(tmp_path), role), state, shape.config())
             for role, state in (("source_base", base), ("source_finetuned", ft), ("target_base", target))}
    result, warnings = graft(paths, tmp_path / "out")
    assert torch.equal(load_dir(str(tmp_path / "out"))[IDS], target[IDS])
    assert not [w for w in warnings if w["code"] == "buffer_changed_by_finetune"]


@pytest.mark.parametrize("where", ["source_finetuned", "source_base", "target_base"])
def test_shape_conflict_fails_naming_the_tensor(tmp_path, where):
    paths = _build(tmp_path, q_shape_conflict=where)
    with pytest.raises(GraftError) as info:
        graft(paths, tmp_path / "out")
    assert info.value.code == "shape_conflict"
    assert Q0 in info.value.message
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_shape_conflict_excluded_is_copied_from_target(tmp_path):
    paths = _build(tmp_path, q_shape_conflict="source_finetuned")
    result, _ = graft(paths, tmp_path / "out", exclude=[r"layers\.0\.self_attn\.q_proj"])
    out = load_dir(str(tmp_path / "out"))
    assert torch.equal(out[Q0], load_dir(paths["target_base"])[Q0])
    assert result.manifest["tensors"][Q0]["action"] == "copied"


@pytest.mark.parametrize("include,exclude", [([r"\.mlp\."], []), ([], [r"\.mlp\.", "norm"]),
                                             ([r"layers\.1\."], [r"_proj"])])
def test_include_exclude_select_transferred_tensors(trio, tmp_path, include, exclude):
    import re

    def selected(name: str) -> bool:
        if include and not any(re.search(p, name) for p in include):
            return False
        return not any(re.search(p, name) for p in exclude)

    result, _ = graft(trio, tmp_path / "out", include=include, exclude=exclude, vocab="target")
    out = load_dir(str(tmp_path / "out"))
    target = load_dir(trio["target_base"])
    expected, _ = expected_output(trio, vocab="target", selected=selected)
    assert_matches_expected(out, expected)
    n_selected = 0
    for name, t in target.items():
        entry = result.manifest["tensors"][name]
        if selected(name) and name != INV:
            n_selected += 1
            assert entry["action"] == "transferred", name
            assert not torch.equal(out[name], t), name
        else:
            assert entry["action"] == "copied", name
            assert torch.equal(out[name], t), name  # bit-exact from the target
    assert 0 < n_selected < len(target) - 1


def test_nan_in_finetune_fails_naming_the_tensor(tmp_path):
    paths = _build(tmp_path, nan_in="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(GraftError) as info:
        graft(paths, tmp_path / "out")
    assert info.value.code == "nonfinite_output"
    assert "model.layers.1.mlp.up_proj.weight" in info.value.message
    assert info.value.details["tensors"] == ["model.layers.1.mlp.up_proj.weight"]
    assert sorted(os.listdir(tmp_path)) == ["source_base", "source_finetuned", "target_base"]


def test_nan_in_excluded_tensor_is_harmless(tmp_path):
    paths = _build(tmp_path, nan_in="model.layers.1.mlp.up_proj.weight")
    graft(paths, tmp_path / "out", exclude=["up_proj"])
    assert torch.isfinite(load_dir(str(tmp_path / "out"))["model.layers.1.mlp.up_proj.weight"].float()).all()


def test_connectivity_proxies_and_weak_connectivity_warning(tmp_path):
    """Related bases: proxies in the manifest, no warning. A target from another run: a warning."""
    from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=64, hidden=32, layers=1, intermediate=64)
    base = llama_state(shape, seed=11)
    paths = {"source_base": save_checkpoint(str(tmp_path / "s"), base, shape.config()),
             "source_finetuned": save_checkpoint(str(tmp_path / "f"), perturb(base, seed=12, scale=0.02),
                                                 shape.config()),
             "target_base": save_checkpoint(str(tmp_path / "t"), perturb(base, seed=13, scale=0.1), shape.config())}
    result, warnings = graft(paths, tmp_path / "related")
    proxies = result.manifest["stats"]["connectivity"]
    # Small relative distances (float32 norms near 1 dominate ||target|| in so small a model).
    assert 0.005 < proxies["bases_distance_ratio"] < 0.2
    assert 0.001 < proxies["delta_ratio"] < proxies["bases_distance_ratio"]
    assert abs(proxies["cos_bases_delta"]) < 0.3  # independent noise: nearly orthogonal
    assert "weak_connectivity" not in {w["code"] for w in warnings}

    unrelated = save_checkpoint(str(tmp_path / "u"), llama_state(shape, seed=99), shape.config())
    result, warnings = graft({**paths, "target_base": unrelated}, tmp_path / "unrelated")
    assert result.manifest["stats"]["connectivity"]["bases_distance_ratio"] > 1.0
    assert "weak_connectivity" in {w["code"] for w in warnings}
    assert "weak_connectivity" in {w["code"] for w in result.manifest["warnings"]}


def test_output_order_follows_an_input_layout_to_spare_remote_seeks(trio, tmp_path):
    """The target is saved in reverse; the plan streams in a source's layout instead, so that input is read
    front to back, each output tensor still written exactly once."""
    from worker.engine.pipeline.resolve import plan_graft
    from worker.engine.planning.options import GraftOptions
    from worker.engine.planning.plan import _seeks
    from worker.engine.planning.request import GraftRequest

    request = GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"],
                                  str(tmp_path / "o"), GraftOptions())
    plan, models = plan_graft(request)
    order = [t.name for t in plan.tensors]
    assert len(order) == len(set(order)) == len(models["target_base"].tensors)
    in_target_order = [n for n in models["target_base"].tensors]
    total = sum(_seeks(order, m.tensors) for m in models.values())
    assert total < sum(_seeks(in_target_order, m.tensors) for m in models.values())
    assert _seeks(order, models["source_base"].tensors) == len(models["source_base"].weight_files)
