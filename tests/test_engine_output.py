"""The result's layout: shards and index, config, tokenizer, generation config, model card, manifest; and
--dry-run, which decides everything from headers alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from graft_helpers import EMBED, HEAD, copy_trio, data_region, graft, load_dir, read_json

from worker.engine import GraftOptions, GraftRequest, plan_graft
from worker.engine.pipeline.manifest import ENGINE_VERSION


def _sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_several_shards_with_index(trio, tmp_path):
    out = tmp_path / "out"
    result, _ = graft(trio, out, shard_size="100KB")
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors" not in names
    index = read_json(out / "model.safetensors.index.json")
    state = load_dir(str(out))
    assert set(index["weight_map"]) == set(state)
    for name, fname in index["weight_map"].items():
        assert fname in shards
        assert name in load_dir_file(out / fname)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for fname in shards:  # no shard exceeds the size asked for unless one tensor alone does
        tensors = load_dir_file(out / fname)
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 100_000 or len(tensors) == 1
    assert result.manifest["plan"]["shards"] == shards
    _loads_with_transformers(str(out), state)


def load_dir_file(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _loads_with_transformers(directory: str, state: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name in params:
            assert torch.equal(params[name].detach(), tensor.float()), name
    assert model.config.vocab_size == state[EMBED].shape[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 263]])).logits
    assert torch.isfinite(logits).all()


def test_single_shard_layout_config_tokenizer_and_card(trio, tmp_path):
    out = tmp_path / "out"
    graft(trio, out)
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "graft-manifest.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith("model-")]
    # config from the target (its context length), vocab_size = output rows
    config = read_json(out / "config.json")
    target_cfg = read_json(os.path.join(trio["target_base"], "config.json"))
    assert config["max_position_embeddings"] == 4096 == target_cfg["max_position_embeddings"]
    assert config["vocab_size"] == 264
    assert {k: v for k, v in config.items() if k != "vocab_size"} == {
        k: v for k, v in target_cfg.items() if k != "vocab_size"}
    # tokenizer and chat template from the fine-tune; generation config from the fine-tune
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(out / name, "rb") as a, open(os.path.join(trio["source_finetuned"], name), "rb") as b:
            assert a.read() == b.read()
    assert "finetuned" in read_json(out / "tokenizer_config.json")["chat_template"]
    assert read_json(out / "generation_config.json")["eos_token_id"] == [2, 3]
    card = (out / "README.md").read_text()
    assert trio["target_base"] in card and trio["source_finetuned"] in card and "alpha" in card
    _loads_with_transformers(str(out), load_dir(str(out)))


def test_tokenizer_from_target_when_finetune_has_none(trio, tmp_path):
    paths = copy_trio(trio, tmp_path / "in")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        os.remove(os.path.join(paths["source_finetuned"], name))
    graft(paths, tmp_path / "out")
    assert "target" in read_json(tmp_path / "out" / "tokenizer_config.json")["chat_template"]
    assert read_json(tmp_path / "out" / "generation_config.json")["eos_token_id"] == 2


def test_manifest(trio, tmp_path):
    out = tmp_path / "out"
    result, _ = graft(trio, out, alpha=0.5, shard_size="100KB", exclude=["norm"])
    manifest = read_json(out / "graft-manifest.json")
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["engine"]["version"] == ENGINE_VERSION
    assert manifest["options"] == {"alpha": 0.5, "vocab": "extend", "dtype": "auto", "shard_size": 100_000,
                                   "device": "auto", "include": [], "exclude": ["norm"]}
    # inputs: uri and a sha256 of every local file
    for role, path in trio.items():
        entry = manifest["inputs"][role]
        assert entry["uri"] == f"file://{path}"
        assert set(entry["files"]) == set(os.listdir(path))
        for name, fp in entry["files"].items():
            assert fp["size"] == os.path.getsize(os.path.join(path, name))
            assert fp["sha256"] == _sha256(os.path.join(path, name))
    # every output file but the manifest itself, with its true size and sha256
    files = {f["path"]: f for f in manifest["output"]["files"]}
    assert set(files) == set(os.listdir(out)) - {"graft-manifest.json"}
    for name, record in files.items():
        assert record["size"] == os.path.getsize(out / name)
        assert record["sha256"] == _sha256(out / name)
    # per tensor: how it was made, and ||delta|| / ||target|| (checked against the inputs)
    state = load_dir(str(out))
    assert set(manifest["tensors"]) == set(state)
    s, f, t = (load_dir(trio[r]) for r in ("source_base", "source_finetuned", "target_base"))
    for name, entry in manifest["tensors"].items():
        assert entry["shape"] == list(state[name].shape)
        if "norm" in name or name == "model.rotary_emb.inv_freq":
            assert entry["action"] == "copied" and "delta_ratio" not in entry
            continue
        assert entry["action"] in ("transferred", "vocab_extended")
        rows = t[name].shape[0]
        delta = (f[name][:rows].double() - s[name][:rows].double()).norm()
        ratio = float(delta / t[name].double().norm())
        assert entry["delta_ratio"] == pytest.approx(ratio, rel=1e-4), name
    assert manifest["tensors"][EMBED]["action"] == "vocab_extended"
    assert manifest["tensors"][HEAD]["rows"]["output_rows"] == 264
    assert manifest["plan"]["tied_word_embeddings"] is False


def _garble_data(paths: dict[str, str]) -> None:
    """Overwrite every tensor byte (not the headers) with garbage of the same length: NaNs and noise."""
    g = torch.Generator().manual_seed(5)
    for path in paths.values():
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                full = os.path.join(path, name)
                start, length = data_region(full)
                junk = torch.randint(0, 256, (length,), generator=g, dtype=torch.uint8).numpy().tobytes()
                junk = b"\xff" * min(64, length) + junk[64:]  # NaN patterns up front
                with open(full, "r+b") as fh:
                    fh.seek(start)
                    fh.write(junk)


def test_dry_run_reads_headers_only(trio, tmp_path):
    request = GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"], "",
                           GraftOptions(shard_size="100KB"))
    before, _ = plan_graft(request)
    garbled = copy_trio(trio, tmp_path / "garbled")
    _garble_data(garbled)
    request_g = GraftRequest.single(garbled["source_base"], garbled["source_finetuned"], garbled["target_base"], "",
                             GraftOptions(shard_size="100KB"))
    after, _ = plan_graft(request_g)
    assert after.to_dict() == before.to_dict()
    summary = before.to_dict()
    assert summary["actions"] == {"copied": 1, "transferred": 19, "vocab_extended": 2}
    assert summary["vocab"]["output_rows"] == 264
    assert len(summary["shards"]) >= 2
    assert summary["output_bytes"] == sum(s["bytes"] for s in summary["shards"])
    # the same garbage does matter to a real run: proof the data region really was garbled
    from worker.engine import GraftError

    with pytest.raises(GraftError):
        graft(garbled, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_dry_run_cli_text_and_json(trio, tmp_path, capsys):
    import worker.progress  # noqa: F401  (see test_engine_bad_input.py)
    from worker.cli import main

    garbled = copy_trio(trio, tmp_path / "garbled")
    _garble_data(garbled)
    common = ["run", "--source-base", garbled["source_base"], "--source-finetuned", garbled["source_finetuned"],
              "--target-base", garbled["target_base"], "--dry-run", "--shard-size", "100KB"]
    assert main(common + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["actions"]["vocab_extended"] == 2 and summary["vocab"]["output_rows"] == 264
    assert main(common) == 0
    text = capsys.readouterr().out
    assert re.search(r"tensors: 22 \(1 copied, 19 transferred, 2 vocab_extended\)", text)
    assert "256 rows transferred, 0 from target, 8 from fine-tune -> 264 rows" in text
    assert f"{summary['output_bytes']:,} bytes in {len(summary['shards'])} shard(s)" in text
    assert os.listdir(tmp_path) == ["garbled"]


def test_failed_run_leaves_existing_parent_clean(trio, tmp_path):
    """A nested output whose parents did not exist: after a failure no output and no temp dir remain."""
    paths = copy_trio(trio, tmp_path / "in")
    shutil.rmtree(paths["source_base"])
    from worker.engine import GraftError

    with pytest.raises(GraftError):
        graft(paths, tmp_path / "deep" / "out")
    assert not os.path.exists(tmp_path / "deep" / "out")


def test_cancelled_run_closes_the_shard_it_was_writing(trio, tmp_path):
    """A stream stopped mid-shard closes that shard's file: no descriptor of the removed temp directory stays
    open (it would pin the preallocated shard's disk space until the process exits)."""
    from worker.engine import GraftCancelled

    def open_fds() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return out

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    before = open_fds()
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(GraftCancelled):
        graft(trio, tmp_path / "out", should_cancel=should_cancel, settings_overrides={"block_bytes": 4096})
    leaked = [p for p in open_fds() - before if ".graft-tmp-" in p]
    assert leaked == []
    assert not os.path.exists(tmp_path / "out")
