"""LoRA export: PEFT loads the adapter with no missing or unexpected keys, at full rank the `peft` profile gives
the full graft's logits, a rank-limited factor is as good as a float64 SVD allows (randomized slack), the `vllm`
profile's config keeps vLLM's rules, and a diff artifact gives the pair's adapter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
from worker.engine.errors import GraftError
from worker.engine.pipeline.diff_extract import extract_diff
from worker.engine.pipeline.lora_export import VLLM_RANKS, LoraExport, LoraExportRequest, export_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = LlamaShape(attention_bias=True,  # Qwen2: q/k/v biases (and no o_proj bias, as Llama's flag would add)
                   extra_config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
ALPHA = 0.75


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, str]:
    """float32 checkpoints (so that the reference is float32 arithmetic), no added rows."""
    root = tmp_path_factory.mktemp("lora")
    base = llama_state(SHAPE, seed=0, dtype=torch.float32)
    states = {"source_base": base, "source_finetuned": perturb(base, seed=1, scale=0.05),
              "target_base": perturb(base, seed=2, scale=0.2)}
    return {role: save_checkpoint(str(root / role), state, SHAPE.config(), shards=2 if role == "target_base" else 1)
            for role, state in states.items()}


def export(trio, out, **spec):
    return export_lora(LoraExportRequest(LoraExport(source_base=trio["source_base"],
                                                    source_finetuned=trio["source_finetuned"],
                                                    target_base=trio["target_base"], output=str(out), **spec)))


def state(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def load_peft(target: str, adapter: str):
    """The target with the adapter, and PEFT's own account of the keys it did not match."""
    model = transformers.AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
    config = peft.PeftConfig.from_pretrained(adapter)
    wrapped = peft.get_peft_model(model, config)
    result = peft.set_peft_model_state_dict(wrapped, load_file(os.path.join(adapter, "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32), adapter)
    return loaded.eval(), missing, list(result.unexpected_keys)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def test_peft_full_rank_reproduces_the_full_graft(trio, tmp_path):
    result = export(trio, tmp_path / "a", rank=64, profile="peft", alpha=ALPHA)  # 64 = min(m, n) everywhere
    model, missing, unexpected = load_peft(trio["target_base"], str(tmp_path / "a"))
    assert missing == [] and unexpected == []
    s, f, t = state(trio["source_base"]), state(trio["source_finetuned"]), state(trio["target_base"])
    grafted = {n: t[n] + ALPHA * (f[n] - s[n]) for n in t}  # the full graft, float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(trio["target_base"], torch_dtype=torch.float32)
    reference.load_state_dict(grafted)
    tokens = torch.randint(0, SHAPE.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = logits(reference.eval(), tokens), logits(model, tokens)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), float((got - want).abs().max())
    plain = logits(transformers.AutoModelForCausalLM.from_pretrained(trio["target_base"]).eval(), tokens)
    assert float((plain - want).abs().max()) > 100 * float((got - want).abs().max())  # the adapter did something
    manifest = result.manifest
    assert manifest["left_out"] == {} and manifest["totals"]["left_out_share"] == 0.0
    assert len(manifest["lora_bias"]) == 3 * SHAPE.layers
    assert all(m["rel_frobenius"] < 1e-5 for m in manifest["modules"].values())


def test_rank_limited_factor_against_a_float64_svd(trio, tmp_path):
    r = 8
    result = export(trio, tmp_path / "a", rank=r, profile="peft", alpha=1.0)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    s, f = state(trio["source_base"]), state(trio["source_finetuned"])
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        delta = (f[module + ".weight"] - s[module + ".weight"]).double().numpy()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        assert a.shape == (r, delta.shape[1]) and b.shape == (delta.shape[0], r)
        sigma = np.linalg.svd(delta, compute_uv=False)
        optimal = np.sqrt((sigma[r:] ** 2).sum()) / np.linalg.norm(delta)  # Eckart-Young: no rank r does better
        error = np.linalg.norm(delta - b @ a) / np.linalg.norm(delta)
        # Randomized SVD with 8 columns of oversampling and a power iteration: Halko et al.'s bound puts the
        # expected excess at a few percent of the optimum for a spectrum as flat as this noise's; 5% is the slack.
        assert optimal - 1e-9 <= error <= 1.05 * optimal, (module, error, optimal)
        entry = result.manifest["modules"][module]
        assert entry["rank"] == r and abs(entry["rel_frobenius"] - error) < 1e-5
        assert abs(entry["retained_energy"] - (1 - error ** 2)) < 1e-5


def test_vllm_profile_keeps_vllms_rules(trio, tmp_path):
    result = export(trio, tmp_path / "a", rank=10, profile="vllm")
    with open(tmp_path / "a" / "adapter_config.json") as fh:
        config = json.load(fh)
    # vLLM's PEFTHelper: r <= max_lora_rank, one of its allowed values; bias "none" (no bias_enabled); no DoRA;
    # modules_to_save refused (beyond lm_head/embeddings, which this profile does not write either).
    assert config["r"] == 16 and config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert config["bias"] == "none" and not config.get("use_dora") and not config.get("lora_bias")
    assert not config.get("modules_to_save") and not config.get("rank_pattern")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    manifest = result.manifest
    left = manifest["left_out"]
    assert "model.norm.weight" in left and "model.embed_tokens.weight" in left
    assert "model.layers.0.self_attn.q_proj.bias" in left
    s, f = state(trio["source_base"]), state(trio["source_finetuned"])
    total = sum(float((f[n].double() - s[n].double()).square().sum()) for n in s)
    for name, entry in left.items():
        share = float((f[name].double() - s[name].double()).square().sum()) / total
        assert abs(entry["share"] - share) < 1e-9 * max(1.0, share) + 1e-12, name
    assert abs(manifest["totals"]["left_out_share"] - sum(e["share"] for e in left.values())) < 1e-9
    _, missing, unexpected = load_peft(trio["target_base"], str(tmp_path / "a"))
    assert missing == [] and unexpected == []


def test_a_diff_artifact_gives_the_pairs_adapter(trio, tmp_path):
    spec = DiffExtract(source_base=trio["source_base"], source_finetuned=trio["source_finetuned"])
    extract_diff(DiffExtractRequest(spec, str(tmp_path / "diff")))
    export(trio, tmp_path / "pair", rank=8, profile="peft")
    export_lora(LoraExportRequest(LoraExport(diff=str(tmp_path / "diff"), target_base=trio["target_base"],
                                             output=str(tmp_path / "art"), rank=8, profile="peft")))
    pair, art = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pair", "art"))
    assert pair.keys() == art.keys()
    assert all(torch.equal(pair[k], art[k]) for k in pair)  # exact encoding: the same delta, the same bits


def test_refusals(trio, tmp_path):
    with pytest.raises(ValueError):
        LoraExport(diff="x", source_base="y", source_finetuned="z", target_base="t", output="o")
    with pytest.raises(ValueError):
        LoraExport(diff="x", target_base="t", output="o", rank=8, energy=0.5)
    with pytest.raises(GraftError) as err:
        export(trio, tmp_path / "a", modules=r"no_such_module")
    assert err.value.code == "no_modules"
    gpt2 = tmp_path / "bloom"  # a layout the export does not know
    gpt2.mkdir()
    for name in os.listdir(trio["target_base"]):
        with open(os.path.join(trio["target_base"], name), "rb") as fh:
            data = fh.read()
        if name == "config.json":
            data = json.dumps({**json.loads(data), "model_type": "bloom"}).encode()
        (gpt2 / name).write_bytes(data)
    with pytest.raises(GraftError) as err:
        export({**trio, "target_base": str(gpt2)}, tmp_path / "b")
    assert err.value.code == "unsupported_architecture"
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "lora-manifest.json").exists()


def test_cli(trio, tmp_path, capsys):
    from worker.cli import main

    out = tmp_path / "cli"
    code = main(["lora", "--source-base", trio["source_base"], "--source-finetuned", trio["source_finetuned"],
                 "--target-base", trio["target_base"], "--output", str(out), "--energy", "0.5",
                 "--power-iterations", "2", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rank"] in VLLM_RANKS and (out / "lora-manifest.json").exists()
    with open(out / "lora-manifest.json") as fh:
        modules = json.load(fh)["modules"]
    assert all(m["retained_energy"] >= 0.5 for m in modules.values())  # each module's own smallest rank
    assert manifest_request(out)["power_iterations"] == 2
    assert main(["lora", "--diff", "x", "--source-base", "y", "--target-base", "t", "--output", "o"]) != 0


def test_cancelled_publishes_nothing(trio, tmp_path):
    from worker.engine.errors import GraftCancelled

    spec = LoraExport(source_base=trio["source_base"], source_finetuned=trio["source_finetuned"],
                      target_base=trio["target_base"], output=str(tmp_path / "c"), rank=8)
    with pytest.raises(GraftCancelled):
        export_lora(LoraExportRequest(spec), should_cancel=lambda: True)
    assert not (tmp_path / "c" / "lora-manifest.json").exists()
    assert not (tmp_path / "c" / "adapter_model.safetensors").exists()


def manifest_request(out) -> dict:
    with open(out / "lora-manifest.json") as fh:
        return json.load(fh)["request"]


def test_bfloat16_factors_are_the_float32_factors_rounded_once(trio, tmp_path):
    """--factor-dtype bfloat16: the same factorization stored in half the bytes, each factor the float32 one
    rounded once (not recomputed), and PEFT loads it."""
    wide = export(trio, tmp_path / "f32", rank=8, profile="peft", alpha=ALPHA)
    narrow = export(trio, tmp_path / "bf16", rank=8, profile="peft", alpha=ALPHA, factor_dtype="bfloat16")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("f32", "bf16"))
    factors = [k for k in a if ".lora_A." in k or ".lora_B." in k]
    assert factors and set(a) == set(b)
    for key in factors:
        assert a[key].dtype == torch.float32 and b[key].dtype == torch.bfloat16
        assert torch.equal(a[key].to(torch.bfloat16), b[key]), key
    for key in set(a) - set(factors):  # modules_to_save keep the target's dtype either way
        assert torch.equal(a[key], b[key]), key
    def data_bytes(d: str) -> int:  # the file less its header (the dtype names differ in length)
        path = tmp_path / d / "adapter_model.safetensors"
        with open(path, "rb") as fh:
            return os.path.getsize(path) - 8 - int.from_bytes(fh.read(8), "little")

    factor_bytes = sum(a[k].numel() for k in factors) * 2
    assert data_bytes("f32") - data_bytes("bf16") == factor_bytes  # two bytes an element saved, no more
    assert narrow.manifest["factor_dtype"] == "bfloat16" and wide.manifest["factor_dtype"] == "float32"
    _, missing, unexpected = load_peft(trio["target_base"], str(tmp_path / "bf16"))
    assert missing == [] and unexpected == []
