"""Vocabulary rows (extend / target, the vocab axis found from config and shapes) and tied embeddings in
every combination, checked numerically and by loading the output with transformers."""

from __future__ import annotations

import os

import pytest
import torch
from graft_helpers import (
    EMBED,
    HEAD,
    ROLES,
    assert_matches_expected,
    expected_output,
    graft,
    load_dir,
    read_json,
)

from worker.devtools.sample_models import (
    LlamaShape,
    chat_tokenizer_files,
    llama_state,
    make_trio,
    perturb,
    save_checkpoint,
)


def _load_causal_lm(directory: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _check_loaded_logits(directory: str, out: dict[str, torch.Tensor], tied: bool) -> None:
    """transformers loads the output and its logits are exactly what the written tensors imply."""
    model = _load_causal_lm(directory)
    head = out[EMBED] if tied else out[HEAD]
    assert torch.equal(model.get_input_embeddings().weight, out[EMBED].float())
    assert torch.equal(model.lm_head.weight, head.float())
    if tied:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 5, 17, out[EMBED].shape[0] - 1, 42]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == out[EMBED].shape[0]
    torch.testing.assert_close(logits, hidden @ head.float().T, rtol=1e-5, atol=1e-5)


# --- vocabulary ---------------------------------------------------------------------------------------

def test_extend_copies_finetune_rows_as_they_are(trio, tmp_path):
    result, _ = graft(trio, tmp_path / "out")  # vocab="extend" is the default
    out = load_dir(str(tmp_path / "out"))
    ft = load_dir(trio["source_finetuned"])
    for name in (EMBED, HEAD):
        assert out[name].shape == (264, 64)
        assert torch.equal(out[name][256:], ft[name][256:])  # bit-exact, not recomputed
        assert result.manifest["tensors"][name]["action"] == "vocab_extended"
        assert result.manifest["tensors"][name]["rows"]["from_finetuned"] == 8
        assert result.manifest["tensors"][name]["rows"]["transferred"] == 256
    config = read_json(str(tmp_path / "out" / "config.json"))
    assert config["vocab_size"] == 264 == out[EMBED].shape[0]
    assert result.manifest["plan"]["vocab"]["output_rows"] == 264


def test_target_policy_keeps_target_rows(trio, tmp_path):
    result, _ = graft(trio, tmp_path / "out", vocab="target")
    out = load_dir(str(tmp_path / "out"))
    for name in (EMBED, HEAD):
        assert out[name].shape == (256, 64)
        assert result.manifest["tensors"][name]["action"] == "transferred"
    expected, _ = expected_output(trio, vocab="target")
    assert_matches_expected(out, expected)
    assert read_json(str(tmp_path / "out" / "config.json"))["vocab_size"] == 256
    _check_loaded_logits(str(tmp_path / "out"), out, tied=False)


def _custom_trio(root, *, target_rows: int = 256, ft_rows: int = 264, extra_vocab_tensor: bool = False):
    """Sources with 256 / ft_rows rows and a target with target_rows rows; optionally a tensor whose name
    says nothing about the vocabulary but whose first axis is the vocabulary (found from config)."""
    shape = LlamaShape()
    g = torch.Generator().manual_seed(99)
    base = llama_state(shape, seed=3)
    if extra_vocab_tensor:
        base["model.token_scales.weight"] = (torch.randn(256, 16, generator=g) * 0.02).to(torch.bfloat16)
    ft = perturb(base, seed=4, scale=0.05)
    target = perturb(base, seed=5, scale=0.2)
    for state, rows in ((ft, ft_rows), (target, target_rows)):
        for name in [EMBED, HEAD] + (["model.token_scales.weight"] if extra_vocab_tensor else []):
            extra = (torch.randn(rows - 256, state[name].shape[1], generator=g) * 0.02).to(state[name].dtype)
            state[name] = torch.cat([state[name], extra])
    paths = {}
    for role, state, rows in (("source_base", base, 256), ("source_finetuned", ft, ft_rows),
                              ("target_base", target, target_rows)):
        paths[role] = save_checkpoint(os.path.join(str(root), role), state, shape.config(vocab=rows),
                                      tokenizer=chat_tokenizer_files(role))
    return paths


def test_vocab_axis_found_from_config_for_unnamed_tensor(tmp_path):
    paths = _custom_trio(tmp_path, extra_vocab_tensor=True)
    result, _ = graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    assert out["model.token_scales.weight"].shape == (264, 16)
    entry = result.manifest["tensors"]["model.token_scales.weight"]
    assert entry["action"] == "vocab_extended" and entry["rows"]["from_finetuned"] == 8
    expected, _ = expected_output(paths)
    assert_matches_expected(out, expected)


@pytest.mark.parametrize("policy", ["extend", "target"])
def test_target_with_more_rows_than_sources(tmp_path, policy):
    paths = _custom_trio(tmp_path, target_rows=272, ft_rows=264)
    result, warnings = graft(paths, tmp_path / "out", vocab=policy)
    out = load_dir(str(tmp_path / "out"))
    target = load_dir(paths["target_base"])
    for name in (EMBED, HEAD):
        assert out[name].shape == (272, 64)  # never fewer rows than the target has
        assert torch.equal(out[name][256:], target[name][256:])  # the target's own rows, as they are
        assert result.manifest["tensors"][name]["rows"]["from_target"] == 16
    expected, _ = expected_output(paths, vocab=policy)
    assert_matches_expected(out, expected)
    assert read_json(str(tmp_path / "out" / "config.json"))["vocab_size"] == 272
    assert any(w["code"] == "vocab_differs" for w in warnings)


# --- tied embeddings ----------------------------------------------------------------------------------

TYING = {  # (source_base, source_finetuned, target_base)
    "all_tied": (True, True, True),
    "all_untied": (False, False, False),
    "target_tied_sources_untied": (False, False, True),
    "target_untied_sources_tied": (True, True, False),
    "base_tied_finetune_untied": (True, False, False),
    "finetune_tied_base_untied": (False, True, False),
    "only_base_untied": (False, True, True),
}


@pytest.fixture(scope="module")
def tying_trios(tmp_path_factory):
    root = tmp_path_factory.mktemp("tying")
    return {key: make_trio(str(root / key), tied=tied, seed=7) for key, tied in TYING.items()}


@pytest.mark.parametrize("case", list(TYING))
def test_tied_embeddings_every_combination(tying_trios, tmp_path, case):
    paths = tying_trios[case]
    tied_in = dict(zip(("source_base", "source_finetuned", "target_base"), TYING[case], strict=True))
    for role in ROLES:  # the inputs are what the case says
        assert (HEAD not in load_dir(paths[role])) == tied_in[role]
    result, warnings = graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    expected, tied_out = expected_output(paths)
    assert tied_out == all(TYING[case])
    # lm_head is written iff the output is untied, and the config says the same.
    assert (HEAD in out) == (not tied_out)
    config = read_json(str(tmp_path / "out" / "config.json"))
    assert config["tie_word_embeddings"] is tied_out
    assert result.manifest["plan"]["tied_word_embeddings"] is tied_out
    # Numerically: each of embed and lm_head got the diff once, from each model's effective lm_head.
    assert_matches_expected(out, expected)
    if not tied_out:
        s, f, t = (load_dir(paths[r]) for r in ROLES)
        eff = {k: v.get(HEAD, v[EMBED]) for k, v in (("s", s), ("f", f), ("t", t))}
        head_ref = eff["t"].double() + (eff["f"][:256].double() - eff["s"].double())
        assert torch.allclose(out[HEAD][:256].double(), head_ref, rtol=0, atol=2e-3)
        # no double add: the embedding got exactly one delta
        emb_ref = t[EMBED].double() + (f[EMBED][:256].double() - s[EMBED].double())
        twice = emb_ref + (f[EMBED][:256].double() - s[EMBED].double())
        err_once = (out[EMBED][:256].double() - emb_ref).abs().max()
        err_twice = (out[EMBED][:256].double() - twice).abs().max()
        assert err_once < err_twice / 10
    if len(set(TYING[case])) > 1:
        assert any(w["code"] == "mixed_tying" for w in warnings)
    _check_loaded_logits(str(tmp_path / "out"), out, tied_out)


def test_tied_target_config_without_flag_still_untied_when_output_writes_lm_head(tying_trios, tmp_path):
    """A target whose config omits tie_word_embeddings (transformers defaults it to True) and stores no
    lm_head, with untied sources: the output writes lm_head and must say tie_word_embeddings false."""
    import json
    import shutil

    paths = dict(tying_trios["target_tied_sources_untied"])
    target = shutil.copytree(paths["target_base"], str(tmp_path / "target"))
    cfg = read_json(os.path.join(target, "config.json"))
    cfg.pop("tie_word_embeddings")
    with open(os.path.join(target, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    paths["target_base"] = target
    graft(paths, tmp_path / "out")
    out = load_dir(str(tmp_path / "out"))
    assert HEAD in out
    assert read_json(str(tmp_path / "out" / "config.json"))["tie_word_embeddings"] is False
    _check_loaded_logits(str(tmp_path / "out"), out, tied=False)
