"""Running the models: loading through the stores, the evaluation of a graft's output (probe losses, KL to
the fine-tune, greedy samples, quality_warning) and its refusals. Every number against float64 references
computed here with transformers' own loader; tokenization by the tokenizers library directly."""

from __future__ import annotations

import math
import os

import pytest
import torch
from eval_helpers import (
    CHAT_TEMPLATE,
    bigram_state,
    encode,
    reference_loss,
    reference_model,
    resolve,
    save,
    tokenizer_files,
    tokenizer_json,
)
from pydantic import ValidationError
from safetensors.torch import load_file

from worker.devtools.sample_models import perturb
from worker.engine.checks.evaluation import EvaluateSpec, evaluate_graft, load_causal_lm
from worker.engine.checks.evaluation import loading as loading_module
from worker.engine.checks.evaluation.probe import builtin_probe_text
from worker.engine.checks.evaluation.spec import DEFAULT_PROMPTS
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError

CAP = 300  # probe tokens: a few windows' worth at 128 positions
PROMPTS = ["Say hello.", "Name a colour of the sky at dusk, in one word."]
GEN = {"bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """target base (a bigram fit), a fine-tune of it (chat template, generation config), an output near
    the target, a broken output (a random model), and a fine-tune without a chat template."""
    root = tmp_path_factory.mktemp("eval")
    ids = encode(builtin_probe_text())
    base = bigram_state(ids, seed=0)
    finetuned = perturb(base, seed=1, scale=0.15)
    chat, plain = tokenizer_files(chat_template=CHAT_TEMPLATE), tokenizer_files()
    return {
        "target": save(str(root / "target"), base, shards=2, tokenizer=plain, max_positions=128),
        "finetuned": save(str(root / "finetuned"), finetuned, tokenizer=chat, generation_config=GEN),
        "finetuned_raw": save(str(root / "finetuned_raw"), finetuned, tokenizer=plain, generation_config=GEN),
        "output": save(str(root / "output"), perturb(base, seed=2, scale=0.05), shards=3, tokenizer=chat,
                       generation_config=GEN),
        "broken": save(str(root / "broken"), perturb(base, seed=3, scale=3.0), tokenizer=chat,
                       generation_config=GEN),
    }


def _resolved(paths: dict, **roles: str) -> dict:
    return {role: resolve(paths[name], role) for role, name in roles.items()}


def _evaluate(paths, *, output="output", finetuned="finetuned", spec=None, **settings):
    m = _resolved(paths, output=output, target_base="target", source_finetuned=finetuned)
    try:
        return evaluate_graft(m["output"], m["target_base"], m["source_finetuned"], spec or EvaluateSpec(
            prompts=PROMPTS, max_new_tokens=6), settings=EngineSettings(probe_max_tokens=CAP, **settings))
    finally:
        for model in m.values():
            model.store.close()


def _reference_kl(finetuned, output, ids: list[int]) -> float:
    """Sum over the prompt's positions of KL(p_finetuned || p_output), float64."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(finetuned(x).logits[0], dim=-1)
        lq = torch.log_softmax(output(x).logits[0], dim=-1)
    return sum(float((lp[i].exp() * (lp[i] - lq[i])).sum()) for i in range(len(ids)))


@pytest.mark.parametrize("finetuned", ["finetuned", "finetuned_raw"])
def test_evaluation_matches_float64_reference(models, finetuned):
    result = _evaluate(models, finetuned=finetuned)
    chat = finetuned == "finetuned"
    ids = encode(builtin_probe_text())[:CAP]
    window = 128  # the target's max_position_embeddings
    probe = result["probe"]
    assert (probe["tokens"], probe["window"], probe["source"]) == (CAP, window, "builtin")
    assert probe["scored_tokens"] == CAP - math.ceil(CAP / window)
    refs = {role: reference_model(models[name]) for role, name in
            (("target_base", "target"), ("output", "output"), ("source_finetuned", finetuned))}
    for role, ref in refs.items():
        loss = reference_loss(ref, ids, window)
        assert probe[role]["loss"] == pytest.approx(loss, rel=1e-5), role
        assert probe[role]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5), role
    # The chat template by hand (not through a template engine): BOS, the user's turn, the assistant's opened.
    rendered = [f"<s><|user|>{p}\n<|assistant|>" if chat else p for p in PROMPTS]
    prompt_ids = [encode(r, special=False) if chat else encode(r) for r in rendered]
    kl = [_reference_kl(refs["source_finetuned"], refs["output"], i) for i in prompt_ids]
    counts = [len(i) for i in prompt_ids]
    assert result["chat_template"] is chat
    assert [s["rendered"] for s in result["samples"]] == rendered
    per_prompt = [k / n for k, n in zip(kl, counts, strict=True)]
    assert result["kl_to_finetuned"]["per_prompt"] == pytest.approx(per_prompt, rel=1e-4)
    assert result["kl_to_finetuned"]["mean"] == pytest.approx(sum(kl) / sum(counts), rel=1e-4)
    assert result["kl_to_finetuned"]["tokens"] == sum(counts)
    assert min(result["kl_to_finetuned"]["per_prompt"]) > 1e-3  # the two models differ: the KL is measured
    assert result["quality_warning"] is None


def _reference_samples(path: str, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' own greedy decoding of the output, float32 as the evaluation runs it."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            seq = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new)
        out.append(seq[0, len(ids):].tolist())
    return out


def test_greedy_samples_equal_transformers_generate_capped_by_settings(models):
    from tokenizers import Tokenizer

    result = _evaluate(models, spec=EvaluateSpec(prompts=PROMPTS, max_new_tokens=32), eval_max_new_tokens=5)
    assert result["max_new_tokens"] == 5
    prompt_ids = [encode(f"<s><|user|>{p}\n<|assistant|>", special=False) for p in PROMPTS]
    expected = _reference_samples(models["output"], prompt_ids, 5)
    decoder = Tokenizer.from_str(tokenizer_json())
    assert [s["tokens"] for s in result["samples"]] == [len(e) for e in expected]
    assert [s["text"] for s in result["samples"]] == [decoder.decode(e, skip_special_tokens=True) for e in expected]
    assert [s["prompt"] for s in result["samples"]] == PROMPTS
    assert all(s["tokens"] == 5 for s in result["samples"])  # no end-of-sequence this early: the cap holds


def test_quality_warning_when_output_is_far_worse(models):
    result = _evaluate(models, output="broken", spec=EvaluateSpec(prompts=PROMPTS[:1], max_new_tokens=1))
    ids = encode(builtin_probe_text())[:CAP]
    target = reference_loss(reference_model(models["target"]), ids, 128)
    broken = reference_loss(reference_model(models["broken"]), ids, 128)
    ratio = math.exp(broken - target)
    assert ratio > 1.5
    warning = result["quality_warning"]
    assert warning["code"] == "quality_warning"
    assert warning["values"]["perplexity_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert warning["thresholds"] == {"perplexity_ratio": 1.5}
    assert f"{ratio:.3g} x" in warning["message"]


def test_default_prompts_and_user_probe_text(models):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    result = _evaluate(models, spec=EvaluateSpec(probe_text=text, max_new_tokens=1))
    assert [s["prompt"] for s in result["samples"]] == list(DEFAULT_PROMPTS)
    assert result["probe"]["source"] == "user"
    ids = encode(text)
    assert result["probe"]["tokens"] == len(ids)
    loss = reference_loss(reference_model(models["output"]), ids, 128)
    assert result["probe"]["output"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_no_tokenizer(models, tmp_path):
    bare = save(str(tmp_path / "bare"), load_file(os.path.join(models["finetuned"], "model.safetensors")))
    m = _resolved({"bare": bare, **models}, output="output", target_base="target", source_finetuned="bare")
    with pytest.raises(GraftError) as err:
        evaluate_graft(m["output"], m["target_base"], m["source_finetuned"], EvaluateSpec(),
                       settings=EngineSettings())
    assert err.value.code == "no_tokenizer"
    assert "source_finetuned" in err.value.message
    # Files that do not make a tokenizer (a config naming a class, no vocabulary) are refused the same way.
    broken = save(str(tmp_path / "broken_tok"), load_file(os.path.join(models["finetuned"], "model.safetensors")),
                  tokenizer={"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"}})
    with pytest.raises(GraftError) as err:
        loading_module.load_tokenizer(resolve(broken, "source_finetuned"))
    assert err.value.code == "no_tokenizer"


def _never_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading_module, "load_causal_lm", refuse)


def test_model_too_large_refused_before_loading(models, monkeypatch):
    _never_load(monkeypatch)
    with pytest.raises(GraftError) as err:
        _evaluate(models, eval_memory_bytes=100_000)
    assert err.value.code == "model_too_large"
    out = resolve(models["output"], "output")
    params = sum(i.numel for i in out.tensors.values()) * 4
    assert f"{params:,}" in err.value.message and "100,000" in err.value.message
    # Available memory lowers the bound: 80% of what the OS reports.
    monkeypatch.setattr(loading_module, "_host_available", lambda: 1_000_000)
    with pytest.raises(GraftError) as err:
        _evaluate(models)
    assert err.value.code == "model_too_large"
    assert "800,000" in err.value.message and "80% of the 1,000,000 bytes available" in err.value.message


def test_eval_timeout_and_cancel(models):
    with pytest.raises(GraftError) as err:
        _evaluate(models, eval_seconds=1e-9)
    assert err.value.code == "eval_timeout"
    # A cancel seen part-way: after the target base's forward passes, while the output loads.
    calls = []
    m = _resolved(models, output="output", target_base="target", source_finetuned="finetuned")

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 40

    with pytest.raises(GraftError) as err:
        evaluate_graft(m["output"], m["target_base"], m["source_finetuned"], EvaluateSpec(prompts=PROMPTS),
                       settings=EngineSettings(probe_max_tokens=CAP), should_cancel=cancel)
    assert err.value.code == "cancelled"
    assert len(calls) == 41


def test_spec_limits():
    assert EvaluateSpec().prompt_list() == list(DEFAULT_PROMPTS)
    assert EvaluateSpec().max_new_tokens == 32
    for bad in ({"prompt": ["x"]}, {"prompts": []}, {"prompts": ["x"] * 17}, {"prompts": [" "]},
                {"prompts": ["é" * 1025]}, {"probe_text": "é" * (32 * 1024 + 1)}, {"max_new_tokens": 0},
                {"max_new_tokens": 129}):
        with pytest.raises(ValidationError):
            EvaluateSpec(**bad)
    assert EvaluateSpec(prompts=["x" * 2048] * 16, probe_text="x" * 65536, max_new_tokens=128)
    schema = EvaluateSpec.model_json_schema()
    assert schema["additionalProperties"] is False
    assert all(p.get("description") for p in schema["properties"].values())


# --- loading ---------------------------------------------------------------------------------------------

def _state_of(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def test_sharded_checkpoint_loads_exactly(models):
    model = resolve(models["output"], "output")
    assert len(model.weight_files) == 3
    module = load_causal_lm(model)
    stored = _state_of(models["output"])
    loaded = module.state_dict()
    assert set(loaded) == set(stored)
    for name, tensor in stored.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.float()), name  # bf16 -> float32 is exact
    assert not module.training


def test_tied_head_reads_the_embedding(tmp_path):
    state = bigram_state(encode("abc abd abe"), seed=4, tied=True)
    path = save(str(tmp_path / "tied"), state, tied=True)
    module = load_causal_lm(resolve(path, "target_base"))
    assert module.lm_head.weight is module.model.embed_tokens.weight
    assert torch.equal(module.lm_head.weight, state["model.embed_tokens.weight"].float())
    # Untied in the config, no lm_head in the file: the head reads the embedding (as the planner does).
    untied = save(str(tmp_path / "untied"), state, tied=False)
    module = load_causal_lm(resolve(untied, "target_base"))
    assert module.lm_head.weight is not module.model.embed_tokens.weight
    assert torch.equal(module.lm_head.weight, state["model.embed_tokens.weight"].float())
    # Tied in the config with a different lm_head stored beside the embedding: refused, not picked.
    bad = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"] * 2})
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(save(str(tmp_path / "bad"), bad, tied=True), "target_base"))
    assert err.value.code == "invalid_input" and "different values" in err.value.message


def test_missing_and_extra_tensors_refused(models, tmp_path):
    state = _state_of(models["output"])
    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(save(str(tmp_path / "missing"), missing), "output"))
    assert err.value.code == "invalid_input" and "model.layers.1.mlp.up_proj.weight" in err.value.message
    extra = dict(state, **{"model.layers.0.mlp.extra.weight": torch.zeros(3)})
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(save(str(tmp_path / "extra"), extra), "output"))
    assert err.value.code == "invalid_input" and "model.layers.0.mlp.extra.weight" in err.value.message
    reshaped = dict(state, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(save(str(tmp_path / "reshaped"), reshaped), "output"))
    assert err.value.code == "invalid_input" and "[65]" in err.value.message
    # Rotary frequencies stored by old checkpoints are computed from the config, as transformers does.
    rotary = dict(state, **{"model.rotary_emb.inv_freq": torch.full((8,), 7.0)})
    module = load_causal_lm(resolve(save(str(tmp_path / "rotary"), rotary), "output"))
    assert module.model.rotary_emb.inv_freq[0] == 1.0


def test_s3_input_loads_like_local(models, tmp_path, s3_endpoint, s3_bucket):
    from conftest import upload_dir

    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    uri = upload_dir(s3_endpoint, models["output"], s3_bucket, "models/output")
    model = resolve_model("output", parse_uri(uri, field="output"), endpoint_url=s3_endpoint)
    try:
        module = load_causal_lm(model)
        tokenizer = loading_module.load_tokenizer(model)
    finally:
        model.store.close()
    stored = _state_of(models["output"])
    assert all(torch.equal(module.state_dict()[n], t.float()) for n, t in stored.items())
    assert tokenizer("hi")["input_ids"] == encode("hi")

