"""A LoRA export with its fidelity measured (worker/engine/checks/checked_lora.py): a rank sweep scores each
adapter through target + adapter with the evaluation of `graft run --evaluate`, against the full graft and the
fine-tune; at full rank the adapter is the full graft (KL ~ 0), the KL falls as the rank grows, and the pick is
the smallest rank within max_kl. The merged model the evaluation scores is checked against PEFT's own merge."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checks_models import checks_family

from worker.engine.checks.checked_lora import _pick, merge_adapter
from worker.engine.config import EngineSettings
from worker.engine.pipeline.lora_export import LoraExport, LoraExportRequest, export_lora

MAX_KL = 4e-5  # between rank 1's and rank 4's KL on this family (the layers' updates are noise: a flat spectrum)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("lora-checks")))


def _settings(tmp_path) -> EngineSettings:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return EngineSettings(cache_dir="", scratch_dir=str(scratch), probe_max_tokens=64, eval_isolation="inline",
                          hash_inputs=False)


@pytest.fixture(scope="module")
def sweep(family, tmp_path_factory):
    """The sweep through the command line (its engine settings from GRAFT_*: the built-in prompts)."""
    from worker.cli import main

    tmp_path = tmp_path_factory.mktemp("sweep")
    (tmp_path / "scratch").mkdir()
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as env, open(os.devnull, "w") as quiet:
        for key, value in (("EVAL_ISOLATION", "inline"), ("SCRATCH_DIR", str(tmp_path / "scratch")),
                           ("PROBE_MAX_TOKENS", "256"), ("EVAL_MAX_NEW_TOKENS", "1"), ("HASH_INPUTS", "false")):
            env.setenv("GRAFT_" + key, value)
        env.setattr("sys.stdout", quiet)
        code = main(["lora", "--source-base", family["base"], "--source-finetuned", family["finetuned"],
                     "--target-base", family["near"], "--output", str(out), "--rank", "1,4,64", "--profile", "peft",
                     "--max-kl", str(MAX_KL), "--device", "cpu"])
    assert code == 0
    with open(out / "lora-manifest.json") as fh:
        return json.load(fh), out, tmp_path


def _spec(family, out, **kw) -> LoraExport:
    return LoraExport(source_base=family["base"], source_finetuned=family["finetuned"], target_base=family["near"],
                      output=str(out), profile="peft", **kw)


def test_sweep_curve_and_pick(sweep):
    manifest, out, tmp_path = sweep
    max_kl = MAX_KL
    fidelity = manifest["fidelity"]
    curve = {c["rank"]: c for c in fidelity["curve"]}
    assert sorted(curve) == [1, 4, 64]
    assert curve[64]["kl_to_full_graft"] < 1e-6  # full rank: the adapter is the graft
    assert abs(curve[64]["probe_loss"] - curve[64]["probe_loss_full_graft"]) < 1e-4
    kls = [curve[r]["kl_to_full_graft"] for r in (1, 4, 64)]
    assert kls[0] > kls[1] > kls[2] and kls[0] > max_kl, kls
    picked = fidelity["picked_rank"]
    assert curve[picked]["kl_to_full_graft"] <= max_kl
    assert all(curve[r]["kl_to_full_graft"] > max_kl for r in curve if r < picked)
    assert manifest["rank"] == picked and (out / "adapter_model.safetensors").exists()
    assert all(c["kl_to_finetuned"] is not None for c in curve.values())
    assert main_refuses_a_bad_rank_list()
    assert not [p for p in os.listdir(tmp_path / "scratch") if p.startswith("graft-lora")]  # nothing left behind


def test_no_rank_within_max_kl_picks_the_largest_and_says_so(sweep):
    curve = sweep[0]["fidelity"]["curve"]
    pick, warnings = _pick(curve, 1e-12)
    assert pick["rank"] == 64 and warnings[0]["code"] == "no_rank_within_max_kl"
    assert _pick(curve, 1.0)[0]["rank"] == 1 and _pick(curve, 1.0)[1] == []


def test_merged_model_is_peft_merge_and_unload(family, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    request = LoraExportRequest(_spec(family, tmp_path / "a", rank=4))
    export_lora(request, _settings(tmp_path))
    merge_adapter(request, str(tmp_path / "a"), str(tmp_path / "m"), _settings(tmp_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(family["near"], dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(model, str(tmp_path / "a")).merge_and_unload().state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).state_dict()
    assert want.keys() == got.keys()
    stored = transformers.AutoModelForCausalLM.from_pretrained(family["near"]).dtype  # the merge's one rounding
    for name in want:  # PEFT merges in float32 here; ours rounds that once to the stored dtype
        assert torch.equal(got[name], want[name].to(stored).float()) or \
            float((got[name] - want[name]).abs().max()) <= 2 ** -7 * float(want[name].abs().max()), name


def _odd_family(arch: str, root) -> dict[str, str]:
    """Tiny models of odd sizes (no dimension a multiple of the chunk): GPT-2 (Conv1D: fan_in_fan_out; wpe and
    the norms carried as modules_to_save), Qwen2 (q/k/v biases: lora_B.bias; a tied embedding with a few
    scattered rows changed: trainable tokens) with a bfloat16 target (the merge's one rounding)."""
    transformers = pytest.importorskip("transformers")
    config = (transformers.GPT2Config(vocab_size=67, n_embd=20, n_layer=1, n_head=4, n_positions=19,
                                      bos_token_id=0, eos_token_id=0) if arch == "gpt2" else
              transformers.Qwen2Config(vocab_size=67, hidden_size=20, intermediate_size=36, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g, paths = torch.Generator().manual_seed(1), {}
    for role, scale in (("source_base", 0.0), ("source_finetuned", 0.05), ("target_base", 0.2)):
        with torch.no_grad():
            for name, p in model.float().named_parameters():
                noise = torch.randn(p.shape, generator=g) * scale * (float(base[name].std()) + 0.1)
                if arch == "qwen2" and name.endswith("embed_tokens.weight") and role == "source_finetuned":
                    keep = torch.zeros(p.shape[0], dtype=torch.bool)
                    keep[[0, 1, 2, 30, 31, 32, 66]] = True
                    noise[~keep] = 0
                p.copy_(base[name] + noise)
        bf16 = arch == "qwen2" and role == "target_base"
        (model.to(torch.bfloat16) if bf16 else model).save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths


def _merge_odd(family: dict[str, str], tmp_path, name: str) -> str:
    spec = LoraExport(source_base=family["source_base"], source_finetuned=family["source_finetuned"],
                      target_base=family["target_base"], output=str(tmp_path / "adapter"), profile="peft", rank=3)
    request = LoraExportRequest(spec)
    if not (tmp_path / "adapter").exists():
        export_lora(request, _settings(tmp_path))
    merge_adapter(request, str(tmp_path / "adapter"), str(tmp_path / name), _settings(tmp_path))
    return str(tmp_path / name)


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as fh:
            out[name] = fh.read()
    return out


def _reference(target: str, adapter: str) -> dict[str, torch.Tensor]:
    """target + adapter in float64, by PEFT's rules (tuners/lora/layer.py, trainable_tokens): W + s B A (Conv1D:
    W + s (B A)^T), bias + lora_B.bias, modules_to_save's values, the trainable token rows replaced."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        config = json.load(fh)
    weights, out = load_file(os.path.join(adapter, "adapter_model.safetensors")), {}
    target_files = [n for n in os.listdir(target) if n.endswith(".safetensors")]
    for name, value in {k: v for f in target_files for k, v in load_file(os.path.join(target, f)).items()}.items():
        module, kind = name.rsplit(".", 1)
        key, value = f"base_model.model.{module}", value.double()
        tokens = f"{key}.token_adapter.trainable_tokens_delta"
        if f"base_model.model.{name}" in weights:
            value = weights[f"base_model.model.{name}"].double()
        elif kind == "weight" and f"{key}.lora_A.weight" in weights:
            d = weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double()
            value = value + config["lora_alpha"] / config["r"] * (d.T if config["fan_in_fan_out"] else d)
        elif kind == "bias" and f"{key}.lora_B.bias" in weights:
            value = value + weights[f"{key}.lora_B.bias"].double()
        elif kind == "weight" and tokens in weights:
            value[config["trainable_token_indices"][module]] = weights[tokens].double()
        out[name] = value
    return out


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_chunked_merge_is_byte_identical_and_exact(arch, tmp_path, monkeypatch):
    """The merge goes row chunk by row chunk (memory: a chunk, never a whole tensor); the chunking changes no
    byte: one chunk per tensor, a few rows per chunk, and one row per chunk (a row wider than the chunk) give the
    same files; and those are target + adapter in float64 within one rounding to the stored dtype (GPT-2: also
    PEFT's own merge_and_unload; Qwen2's zero lora_B.bias on o_proj, which has no bias, PEFT refuses to merge)."""
    from safetensors.torch import load_file

    from worker.engine.checks import checked_lora
    from worker.engine.storage import local_files

    family = _odd_family(arch, tmp_path)
    merged, reads, writes = {}, [], []
    read_into, write = local_files.LocalStore.read_into, local_files._LocalWriter.write
    monkeypatch.setattr(local_files.LocalStore, "read_into", lambda self, name, start, view: (
        reads.append((name, start, len(view))), read_into(self, name, start, view))[1])
    monkeypatch.setattr(local_files._LocalWriter, "write", lambda self, data: (
        writes.append(len(data)), write(self, data))[1])
    for chunk in (1 << 30, 50, 1):
        monkeypatch.setattr(checked_lora, "CHUNK", chunk)
        reads.clear(), writes.clear()
        merged[chunk] = _files(_merge_odd(family, tmp_path, f"merged-{chunk}"))
    # Memory: a chunk of rows (one row where a row is wider than the chunk): 80 float32 elements at most here.
    data = [n for _, start, n in reads if start > 0]  # those at 0: the headers, read when the target resolves
    assert len(data) > 200 and max(data) <= 80 * 4
    assert sorted(writes)[-3] <= 80 * 4  # written: chunks and headers; the 2 larger ones are config.json and index
    assert len(merged[1 << 30]) > 3 and merged[50] == merged[1 << 30] and merged[1] == merged[1 << 30]
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / f"merged-{1 << 30}")
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        config = json.load(fh)
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["trainable_token_indices"]
    assert config["modules_to_save"] if arch == "gpt2" else config["lora_bias"]
    got = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in
           load_file(os.path.join(out, f)).items()}
    want = _reference(family["target_base"], adapter)
    assert got.keys() == want.keys()
    for name, value in got.items():  # one rounding to the stored dtype (2^-9 relative for bfloat16)
        slack = 2 ** -8 if value.dtype == torch.bfloat16 else 1e-6
        error = (value.double() - want[name]).abs()
        assert bool((error <= slack * want[name].abs() + 1e-6 * float(want[name].abs().max())).all()), name
    if arch == "gpt2":
        peft = pytest.importorskip("peft")
        transformers = pytest.importorskip("transformers")
        model = transformers.AutoModelForCausalLM.from_pretrained(family["target_base"], dtype=torch.float32)
        merged_peft = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
        for name, value in got.items():
            assert torch.allclose(value, merged_peft[name], rtol=1e-6, atol=1e-7), name


def main_refuses_a_bad_rank_list() -> bool:
    from worker.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["lora", "--source-base", "a", "--source-finetuned", "b", "--target-base", "t", "--output", "o",
              "--rank", "8,x"])
    return exit_.value.code != 0
