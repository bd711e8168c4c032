"""LoRA export across the layouts it knows: Llama, Qwen2 (biases, tied embeddings, a few embedding rows changed),
Gemma2 (tied) and GPT-2 (Conv1D, stored [in, out]; tied). Tiny random models built with transformers here. Per
architecture: PEFT loads both profiles with no missing or unexpected keys, at full rank the `peft` profile gives
the full graft's logits (float32), a rank-limited factor is within the randomized slack of a float64 SVD's
optimum (Eckart-Young), and the `vllm` profile's config keeps vLLM's documented rules."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worker.engine.pipeline.lora_export import VLLM_RANKS, LoraExport, LoraExportRequest, export_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALPHA = 0.8
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, attn_implementation="eager"),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                            bos_token_id=0, eos_token_id=0),
}
FULL_RANK = 32  # min(out, in) of every factored module at hidden 32
CHANGED_ROWS = 10  # qwen2's fine-tune changes only these embedding rows


def _noise(params: dict[str, torch.Tensor], seed: int, scale: float, rows_only: str | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in params.items():
        noise = torch.randn(value.shape, generator=g) * scale * (value.std() if value.numel() > 1 else 1.0)
        if rows_only is not None and name == rows_only:
            noise[CHANGED_ROWS:] = 0
        out[name] = value + noise
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trio(request, tmp_path_factory) -> dict:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).float()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # tied: one name for the shared matrix
    embed = next(n for n in base if n.endswith(("embed_tokens.weight", "wte.weight")))
    states = {"source_base": base,
              "source_finetuned": _noise(base, 1, 0.05, rows_only=embed if arch == "qwen2" else None),
              "target_base": _noise(base, 2, 0.2)}
    paths = {"arch": arch}
    for role, state in states.items():
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
        model.save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths


def export(trio, out, **spec):
    return export_lora(LoraExportRequest(LoraExport(source_base=trio["source_base"],
                                                    source_finetuned=trio["source_finetuned"],
                                                    target_base=trio["target_base"], output=str(out), **spec)))


def files(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def load_peft(target: str, adapter: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.PeftConfig.from_pretrained(adapter))
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    result = peft.set_peft_model_state_dict(wrapped, weights)
    # A tied embedding's trainable tokens: PEFT gives lm_head's layer the embedding's own parameter and saves it
    # once; its name is reported missing though it is the loaded tensor itself.
    state = wrapped.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in state if k not in result.missing_keys}
    missing = [k for k in result.missing_keys if ("lora_" in k or "modules_to_save" in k or "token_adapter" in k)
               and "base_layer" not in k and "original_module" not in k and state[k].data_ptr() not in loaded]
    served = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), adapter)
    return served.eval(), missing, list(result.unexpected_keys)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def test_peft_profile_at_full_rank_is_the_full_graft(trio, tmp_path):
    result = export(trio, tmp_path / "a", rank=FULL_RANK, profile="peft", alpha=ALPHA)
    model, missing, unexpected = load_peft(trio["target_base"], str(tmp_path / "a"))
    assert missing == [] and unexpected == []
    s, f, t = files(trio["source_base"]), files(trio["source_finetuned"]), files(trio["target_base"])
    grafted = {n: t[n] + ALPHA * (f[n] - s[n]) for n in t}  # the full graft, float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(trio["target_base"], dtype=torch.float32)
    with torch.no_grad():
        for name, p in reference.named_parameters():  # tied: the one shared matrix takes the grafted embedding
            p.copy_(grafted[name])
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = logits(reference.eval(), tokens), logits(model, tokens)
    assert torch.allclose(got, want, atol=5e-5, rtol=1e-4), float((got - want).abs().max())
    plain = logits(transformers.AutoModelForCausalLM.from_pretrained(trio["target_base"]).eval(), tokens)
    assert float((plain - want).abs().max()) > 100 * float((got - want).abs().max())
    manifest = result.manifest
    assert manifest["left_out"] == {} and manifest["architecture"] == trio["arch"]
    assert all(m["rel_frobenius"] < 1e-5 for m in manifest["modules"].values())
    with open(tmp_path / "a" / "adapter_config.json") as fh:
        config = json.load(fh)
    assert config["fan_in_fan_out"] is (trio["arch"] == "gpt2")
    rows = manifest["trainable_tokens"]["changed_rows"]
    assert rows == (CHANGED_ROWS if trio["arch"] == "qwen2" else 64)


def test_rank_limited_factor_against_a_float64_svd(trio, tmp_path):
    r = 4
    result = export(trio, tmp_path / "a", rank=r, profile="peft", power_iterations=2)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    s, f = files(trio["source_base"]), files(trio["source_finetuned"])
    gpt2 = trio["arch"] == "gpt2"
    for module in result.manifest["modules"]:
        delta = (f[module + ".weight"] - s[module + ".weight"]).double().numpy()
        if gpt2:
            delta = delta.T  # Conv1D stores [in, out]; PEFT adds transpose(B A), so B A is [out, in]
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        assert a.shape == (r, delta.shape[1]) and b.shape == (delta.shape[0], r)
        sigma = np.linalg.svd(delta, compute_uv=False)
        optimal = np.sqrt((sigma[r:] ** 2).sum()) / np.linalg.norm(delta)
        error = np.linalg.norm(delta - b @ a) / np.linalg.norm(delta)
        # Randomized SVD (8 columns of oversampling, two power iterations) on a noise spectrum: Halko et al.'s
        # bound puts the expected excess at a few percent of the optimum; 5% is the slack.
        assert optimal - 1e-9 <= error <= 1.05 * optimal, (module, error, optimal)


def vllm_rules(config: dict, keys: list[str]) -> None:
    """vLLM's PEFTHelper (vllm/lora/peft_helper.py): r one of max_lora_rank's allowed values, bias "none" (no
    bias_enabled), no DoRA, modules_to_save None; its loader takes lora_A/lora_B weights only."""
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert config["bias"] == "none" and not config.get("use_dora") and not config.get("lora_bias")
    assert config.get("modules_to_save") is None and not config.get("rank_pattern")
    assert not config.get("trainable_token_indices")
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)


def test_vllm_profile(trio, tmp_path):
    result = export(trio, tmp_path / "a", rank=6, profile="vllm")
    with open(tmp_path / "a" / "adapter_config.json") as fh:
        config = json.load(fh)
    vllm_rules(config, list(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))))
    assert config["r"] == 8
    left = result.manifest["left_out"]
    assert any(n.endswith(("embed_tokens.weight", "wte.weight")) for n in left)
    assert all(0 <= e["share"] <= 1 for e in left.values())
    _, missing, unexpected = load_peft(trio["target_base"], str(tmp_path / "a"))
    assert missing == [] and unexpected == []
