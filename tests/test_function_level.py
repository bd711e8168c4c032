"""The function level of `graft inspect`: losses along source_base -> target_base and the barrier, against a
float64 reference computed here (the two checkpoints read with safetensors, interpolated in float64, scored
by transformers' own LlamaForCausalLM); and its refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from eval_helpers import bigram_state, encode, reference_loss, resolve, save, tokenizer_files
from safetensors.torch import load_file

from worker.devtools.sample_models import perturb
from worker.engine.checks.evaluation import loading as loading_module
from worker.engine.checks.evaluation.probe import builtin_probe_text
from worker.engine.checks.inspect import function as function_module
from worker.engine.checks.inspect.function import function_probe
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError

CAP = 300
WINDOW = 128  # the models' max_position_embeddings: three windows over the probe
LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A bigram-fit base; a near continuation of it; the same function with its embedding and head turned
    by a random rotation (weights far apart, a barrier between); and a tied one."""
    root = tmp_path_factory.mktemp("function")
    ids = encode(builtin_probe_text())
    base = bigram_state(ids, seed=0)
    tok = tokenizer_files()
    return {
        "base": save(str(root / "base"), base, tokenizer=tok, max_positions=WINDOW),
        "near": save(str(root / "near"), perturb(base, seed=1, scale=0.03), shards=3, max_positions=WINDOW),
        "rotated": save(str(root / "rotated"), {k: v.float() for k, v in bigram_state(
            ids, seed=2, rotation_seed=7).items()}, shards=2, max_positions=4 * WINDOW),
        "tied": save(str(root / "tied"), bigram_state(ids, seed=3, tied=True), tied=True, max_positions=WINDOW),
    }


def _state64(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update({k: v.double() for k, v in load_file(os.path.join(path, name)).items()})
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])  # a tied file's head is its embedding
    return out


def _reference_line(source: str, target: str, ids: list[int]) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    s, t = _state64(source), _state64(target)
    with open(os.path.join(source, "config.json")) as fh:
        config = LlamaConfig(**dict(json.load(fh), tie_word_embeddings=False))
    model = LlamaForCausalLM(config).double().eval()
    losses = []
    for lam in LAMBDAS:
        model.load_state_dict({k: (1 - lam) * s[k] + lam * t[k] for k in s}, strict=True)
        losses.append(reference_loss(model, ids, WINDOW))
    return losses


def _probe(bases, source="base", target="rotated", tokenizer="base", text=None, **settings):
    models = {role: resolve(bases[name], role) for role, name in
              (("source_base", source), ("target_base", target), ("tok", tokenizer))}
    try:
        return function_probe(models["source_base"], models["target_base"], models["tok"], text=text,
                              settings=EngineSettings(probe_max_tokens=CAP, **settings))
    finally:
        for m in models.values():
            m.store.close()


@pytest.mark.parametrize("target", ["rotated", "near", "tied"])
def test_line_and_barrier_match_float64_reference(bases, target):
    result = _probe(bases, target=target)
    ids = encode(builtin_probe_text())[:CAP]
    ref = _reference_line(bases["base"], bases[target], ids)
    assert result["lambdas"] == LAMBDAS
    assert result["losses"] == pytest.approx(ref, rel=1e-5)
    excess = [loss - ((1 - lam) * ref[0] + lam * ref[-1]) for lam, loss in zip(LAMBDAS, ref, strict=True)]
    barrier = max(excess)
    scale = (ref[0] + ref[-1]) / 2
    assert result["barrier"] == pytest.approx(barrier, abs=1e-5 * scale)
    assert result["barrier_ratio"] == pytest.approx(barrier / scale, abs=1e-5)
    assert (result["tokens"], result["window"], result["probe"]) == (CAP, WINDOW, "builtin")
    assert result["untied"] is (target == "tied")
    if target == "rotated":  # the same function, other weights: a real barrier, measured
        assert ref[0] == pytest.approx(ref[-1], rel=0.05) and barrier > 0.1 * scale
    if target == "near":
        assert barrier < 0.01 * scale


def test_user_probe_text(bases):
    text = "Every river runs to the sea, and the sea is never full. " * 4
    result = _probe(bases, target="near", text=text)
    ids = encode(text)
    assert (result["probe"], result["tokens"]) == ("user", len(ids))
    assert result["losses"] == pytest.approx(_reference_line(bases["base"], bases["near"], ids), rel=1e-5)
    with pytest.raises(GraftError) as err:
        _probe(bases, target="near", text="")
    assert err.value.code == "invalid_option"


def test_mismatched_bases_refused_before_loading(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(function_module, "loaded", None)  # any load would fail with a TypeError
    state = load_file(os.path.join(bases["base"], "model.safetensors"))
    with open(os.path.join(bases["base"], "config.json")) as fh:
        config = json.load(fh)
    eps = save(str(tmp_path / "eps"), state, max_positions=WINDOW)
    with open(os.path.join(eps, "config.json"), "w") as fh:
        json.dump(dict(config, rms_norm_eps=1e-3), fh)
    with pytest.raises(GraftError) as err:
        _probe({**bases, "eps": eps}, target="eps")
    assert err.value.code == "config_mismatch" and "rms_norm_eps" in err.value.message
    wider = dict(state, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(GraftError) as err:
        _probe({**bases, "wider": save(str(tmp_path / "wider"), wider)}, target="wider")
    assert err.value.code == "shape_conflict" and "model.norm.weight [64] vs [65]" in err.value.message
    other = save(str(tmp_path / "other"), state)
    with open(os.path.join(other, "config.json"), "w") as fh:
        json.dump(dict(config, model_type="mistral"), fh)
    with pytest.raises(GraftError) as err:
        _probe({**bases, "other": other}, target="other")
    assert err.value.code == "architecture_mismatch"


def test_model_too_large_refused_before_loading(bases, monkeypatch):
    monkeypatch.setattr(function_module, "loaded", None)
    with pytest.raises(GraftError) as err:
        _probe(bases, eval_memory_bytes=50_000)
    assert err.value.code == "model_too_large"
    params = sum(i.numel for i in resolve(bases["base"], "x").tensors.values()) * 4
    # Two modules at once (the walker and the target turned into the difference), not three.
    assert f"{2 * params:,} of float32 parameters" in err.value.message and "50,000" in err.value.message
    monkeypatch.setattr(loading_module, "_host_available", lambda: 100_000)
    with pytest.raises(GraftError) as err:
        _probe(bases)
    assert err.value.code == "model_too_large" and "80% of the 100,000 bytes available" in err.value.message


def test_no_tokenizer(bases):
    with pytest.raises(GraftError) as err:
        _probe(bases, tokenizer="near")
    assert err.value.code == "no_tokenizer" and "tok" in err.value.message


def test_eval_timeout(bases):
    with pytest.raises(GraftError) as err:
        _probe(bases, eval_seconds=1e-9)
    assert err.value.code == "eval_timeout" and "GRAFT_EVAL_SECONDS" in err.value.message


def test_cancel_between_forward_passes(bases):
    models = {role: resolve(bases[name], role) for role, name in (("source_base", "base"), ("target_base", "near"))}
    seen = []

    def cancel() -> bool:  # after both loads (21 tensors each) and the ends' passes: on the line's first point
        seen.append(1)
        return len(seen) > 1 + 21 + 3 + 21 + 3
    with pytest.raises(GraftError) as err:
        function_probe(models["source_base"], models["target_base"], models["source_base"], text=None,
                       settings=EngineSettings(probe_max_tokens=CAP), should_cancel=cancel)
    assert err.value.code == "cancelled"
    assert len(seen) == 1 + 21 + 3 + 21 + 3 + 1


def test_a_tied_base_built_untied_counts_its_extra_head(bases, monkeypatch):
    """Against an untied target, the tied base is built with a head of its own: the memory check is asked for
    one more embedding of float32 bytes than against a tied-alike target."""
    asked = {}
    real = loading_module.check_fits

    def spy(models, settings, **kwargs):
        asked[tuple(m.uri for m in models)] = kwargs["extra_bytes"]
        return real(models, settings, **kwargs)

    monkeypatch.setattr(loading_module, "check_fits", spy)
    _probe(bases, source="tied", target="base")
    _probe(bases, source="tied", target="tied")
    embed = load_file(os.path.join(bases["tied"], "model.safetensors"))["model.embed_tokens.weight"]
    untied, alike = (asked[(f"file://{bases['tied']}", f"file://{bases[t]}")] for t in ("base", "tied"))
    assert untied - alike == embed.numel() * 4
