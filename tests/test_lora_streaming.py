"""The adapter is written as it is factored, never built in memory first: with `rank`, the header (from the
shapes) goes out first and each module's lora_A/lora_B bytes leave before the next module is factored, so what is
held is one module's factors; with `energy`, each module's factors leave for a scratch file as they come. The
header written up front agrees with the bytes behind it (safetensors reads every tensor back)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine.pipeline import lora_export
from worker.engine.pipeline.lora_export import LoraExport, LoraExportRequest, export_lora

SHAPE = LlamaShape(layers=3, hidden=32, intermediate=48, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stream")
    base = llama_state(SHAPE, seed=0, dtype=torch.float32)
    states = {"source_base": base, "source_finetuned": perturb(base, seed=1), "target_base": perturb(base, seed=2)}
    return {role: save_checkpoint(str(root / role), st, SHAPE.config()) for role, st in states.items()}


@pytest.mark.parametrize("spec", [{"rank": 8, "profile": "vllm"}, {"energy": 0.9, "profile": "peft"}],
                         ids=["rank", "energy"])
def test_each_module_leaves_before_the_next_is_factored(trio, tmp_path, monkeypatch, spec):
    events: list[tuple[str, int]] = []
    real_bytes, real_save = lora_export.as_bytes, torch.save

    def written(t):
        events.append(("write", t.numel()))
        return real_bytes(t)

    def spooled(obj, path, *a, **k):
        events.append(("spool", sum(x.numel() for x in obj)))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(lora_export, "as_bytes", written)
    monkeypatch.setattr(lora_export.torch, "save", spooled)
    out = tmp_path / "a"
    result = export_lora(LoraExportRequest(LoraExport(source_base=trio["source_base"],
                                                      source_finetuned=trio["source_finetuned"],
                                                      target_base=trio["target_base"], output=str(out), **spec)),
                         progress=lambda p: events.append(("factored", p["modules_done"])))
    modules = list(result.manifest["modules"])
    factored = [i for i, e in enumerate(events) if e[0] == "factored"]
    assert len(factored) == len(modules) == 7 * SHAPE.layers
    for k, at in enumerate(factored):  # right after module k is factored: its bytes out, before module k + 1
        after = events[at + 1:factored[k + 1] if k + 1 < len(factored) else len(events)]
        kind = "spool" if "energy" in spec else "write"
        assert after and after[0][0] == kind, (k, after[:3])
        if kind == "write":
            assert [e[0] for e in after[:2]] == ["write", "write"]  # lora_A, lora_B
    tensors = load_file(str(out / "adapter_model.safetensors"))
    r = result.manifest["rank"]
    for name in modules:
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == r
        assert tensors[f"base_model.model.{name}.lora_B.weight"].shape[1] == r


def test_device_choice(trio, tmp_path):
    """The factorization runs where --device says; auto without a GPU is the CPU, bit for bit, and cuda without
    one is refused before anything is written."""
    from worker.engine.errors import GraftError

    def run(name: str, device: str):
        return export_lora(LoraExportRequest(LoraExport(source_base=trio["source_base"],
                                                        source_finetuned=trio["source_finetuned"],
                                                        target_base=trio["target_base"], output=str(tmp_path / name),
                                                        rank=8, device=device)))

    cpu = run("cpu", "cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto would take it")
    auto = run("auto", "auto")
    assert auto.manifest["stats"]["device"] == "cpu"
    assert [f["sha256"] for f in auto.manifest["files"]] == [f["sha256"] for f in cpu.manifest["files"]]
    with pytest.raises(GraftError) as err:
        run("cuda", "cuda")
    assert err.value.code == "invalid_option" and not (tmp_path / "cuda").exists()
