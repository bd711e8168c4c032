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



def main_refuses_a_bad_rank_list() -> bool:
    from worker.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["lora", "--source-base", "a", "--source-finetuned", "b", "--target-base", "t", "--output", "o",
              "--rank", "8,x"])
    return exit_.value.code != 0
