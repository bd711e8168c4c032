"""graft inspect, level headers: config agreement, a plan that cannot be made as a reason, tensor alignment,
tied layouts, tokenizer agreement (re-assigned, added and renamed special ids) and the estimates."""

from __future__ import annotations

import json
import os

import pytest
from graft_helpers import load_dir

from worker.devtools.sample_models import LlamaShape, llama_state, make_trio, perturb, save_checkpoint
from worker.engine import GraftOptions, GraftRequest
from worker.engine.checks.inspect import Level, inspect_graft
from worker.engine.config import EngineSettings

SHAPE = LlamaShape()
VOCAB = SHAPE.vocab


def tokenizer_json(tokens: list[str], special: dict[int, str] | None = None) -> dict:
    """A BPE tokenizer.json whose ids are the list's positions; `special`: added special tokens by id."""
    added = [{"id": i, "content": t, "special": True} for i, t in (special or {}).items()]
    return {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)
                                                                if i not in (special or {})}, "merges": []},
            "added_tokens": added}


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def trio(root, *, target_config: dict | None = None, target_shape: LlamaShape | None = None,
         tokenizers: dict[str, dict] | None = None, ft_rows: int = 0) -> dict[str, str]:
    """source_base, source_finetuned (optionally with added rows) and target_base, each with the
    tokenizer files given for its role (none by default) and the target's config changed as given."""
    base = llama_state(SHAPE, seed=1)
    target = perturb(base, seed=3, scale=0.1) if target_shape is None else llama_state(target_shape, seed=3)
    states = {"source_base": (base, SHAPE.config()),
              "source_finetuned": (perturb(base, seed=2, extra_rows=ft_rows), SHAPE.config(vocab=VOCAB + ft_rows)),
              "target_base": (target, {**(target_shape or SHAPE).config(), **(target_config or {})})}
    return {role: save_checkpoint(os.path.join(str(root), role), state, config,
                                  tokenizer=(tokenizers or {}).get(role))
            for role, (state, config) in states.items()}


def inspect(paths: dict[str, str], level: Level = Level.HEADERS, **options) -> dict:
    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], "",
                           GraftOptions(**options))
    report = inspect_graft(request, level=level).report
    json.dumps(report, allow_nan=False)  # JSON as it is
    return report


def reasons(report: dict) -> dict[str, dict]:
    return {r["code"]: r for r in report["reasons"]}


# --- configs and plans ----------------------------------------------------------------------------------

def test_other_model_type_is_incompatible(tmp_path):
    report = inspect(trio(tmp_path, target_config={"model_type": "mistral"}))
    assert report["verdict"] == "incompatible"
    r = reasons(report)["architecture_mismatch"]
    assert r["verdict"] == "incompatible" and r["level"] == "headers" and "mistral" in r["message"]
    assert {"key": "model_type", "between": ["source_base", "target_base"], "values": ["llama", "mistral"]} \
        in report["headers"]["config"]["differences"]


def test_head_split_differs_with_equal_shapes(tmp_path):
    """Same tensor shapes, heads split another way: the plan is fine, the config check is not."""
    report = inspect(trio(tmp_path, target_config={"num_attention_heads": 8, "head_dim": 8,
                                                    "num_key_value_heads": 4}), Level.WEIGHTS)
    r = reasons(report)["architecture_mismatch"]
    assert r["values"] == {"num_attention_heads.a": 4, "num_attention_heads.b": 8, "num_key_value_heads.a": 2,
                           "num_key_value_heads.b": 4, "head_dim.a": 16, "head_dim.b": 8}
    assert report["verdict"] == "incompatible" and report["levels_run"] == ["headers", "weights"]


def test_unplannable_graft_is_a_reason_not_an_exception(tmp_path):
    wide = LlamaShape(intermediate=96)
    report = inspect(trio(tmp_path, target_shape=wide), Level.WEIGHTS)
    r = reasons(report)
    assert report["verdict"] == "incompatible"
    assert r["shape_conflict"]["verdict"] == "incompatible" and "mlp.up_proj" in r["shape_conflict"]["message"]
    assert r["shape_conflict"]["values"]["tensors"] == 3 * SHAPE.layers  # gate, up, down per layer
    assert r["architecture_mismatch"]["values"]["intermediate_size.b"] == 96
    assert report["levels_run"] == ["headers"] and "skipped" in report["weights"]
    assert report["headers"]["plan"]["error"]["code"] == "shape_conflict" and report["estimates"] == {}


def test_rope_theta_risky_context_informational(tmp_path):
    report = inspect(trio(tmp_path, target_config={"rope_theta": 500000.0, "max_position_embeddings": 8192}))
    r = reasons(report)
    assert r["rope_changed"]["verdict"] == "risky" and r["rope_changed"]["values"] == {
        "rope_theta.a": 10000.0, "rope_theta.b": 500000.0}
    assert r["context_changed"]["verdict"] == "compatible"
    assert report["verdict"] == "risky"
    report = inspect(trio(tmp_path / "ctx", target_config={"max_position_embeddings": 8192,
                                                           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    assert report["verdict"] == "compatible"
    assert {"context_changed", "rope_scaling_changed"} <= set(reasons(report))


# --- tensors and tying ----------------------------------------------------------------------------------

def test_alignment_and_tied_layouts(tmp_path):
    paths = make_trio(str(tmp_path), shape=SHAPE, tied=(True, True, False))
    report = inspect(paths)
    headers = report["headers"]
    assert {role: m["tied"] for role, m in headers["models"].items()} == {
        "target_base": False, "source_base": True, "source_finetuned": True}
    assert reasons(report)["mixed_tying"]["verdict"] == "compatible"
    T, S, F = (load_dir(paths[r]) for r in ("target_base", "source_base", "source_finetuned"))
    (al,) = headers["alignment"]
    assert al["common"] == len(set(T) & set(S) & set(F))
    assert al["target_only"] == len(set(T) - (set(S) & set(F)))
    assert set(al["target_only_names"]) == set(T) - (set(S) & set(F)) == {"lm_head.weight",
                                                                          "model.rotary_emb.inv_freq"}
    assert al["source_only"] == 0 and al["dtype_differences"] == 0
    shape_differ = {n for n in set(T) & set(S) & set(F) if not T[n].shape == S[n].shape == F[n].shape}
    assert al["shape_differences"] == len(shape_differ) == 1  # the embedding: the fine-tune added rows
    for role, d in (("target_base", T), ("source_base", S), ("source_finetuned", F)):
        m = headers["models"][role]
        assert m["tensors"] == len(d)
        assert m["parameters"] == sum(t.numel() for t in d.values() if t.is_floating_point())


# --- tokenizers -----------------------------------------------------------------------------------------

def test_reassigned_ids_incompatible_with_count(tmp_path):
    base = words(VOCAB)
    target = list(base)
    target[10], target[11] = target[11], target[10]
    target[40] = "renamed"
    paths = trio(tmp_path, tokenizers={"source_base": {"tokenizer.json": tokenizer_json(base)},
                                       "target_base": {"tokenizer.json": tokenizer_json(target)}})
    report = inspect(paths)
    differing = [i for i in range(VOCAB) if base[i] != target[i]]
    r = reasons(report)["tokenizer_ids_reassigned"]
    assert report["verdict"] == "incompatible" and r["verdict"] == "incompatible"
    assert r["values"]["reassigned"] == len(differing) == 3 and r["values"]["rows_compared"] == VOCAB
    (entry,) = report["headers"]["tokenizer"]
    assert [e["id"] for e in entry["examples"]] == differing
    assert entry["examples"][0] == {"id": 10, "source": "w10", "target": "w11"}


def test_tokens_added_by_the_finetune_are_fine(tmp_path):
    base = words(VOCAB)
    ft = base + [f"new{i}" for i in range(8)]
    paths = trio(tmp_path, ft_rows=8, tokenizers={"source_base": {"tokenizer.json": tokenizer_json(base)},
                                                  "source_finetuned": {"tokenizer.json": tokenizer_json(ft)},
                                                  "target_base": {"tokenizer.json": tokenizer_json(base)}})
    report = inspect(paths)
    assert report["verdict"] == "compatible"
    r = reasons(report)["tokens_added_by_finetune"]
    assert r["verdict"] == "compatible" and r["values"] == {"added": 8}
    (entry,) = report["headers"]["tokenizer"]
    assert entry["reassigned"] == 0 and entry["rows_compared"] == VOCAB and entry["source"] == "source_base"
    assert entry["finetune_changes"]["added_examples"][0] == {"id": VOCAB, "token": "new0"}


def test_renamed_special_tokens_risky(tmp_path):
    base, target = words(VOCAB), words(VOCAB)
    paths = trio(tmp_path, tokenizers={
        "source_base": {"tokenizer.json": tokenizer_json(base, {250: "<|reserved_0|>", 251: "<|reserved_1|>"})},
        "target_base": {"tokenizer.json": tokenizer_json(target, {250: "<|eot|>", 251: "<|reserved_1|>"})}})
    report = inspect(paths)
    r = reasons(report)["special_tokens_reassigned"]
    assert report["verdict"] == "risky" and r["values"]["reassigned_special"] == 1 and r["values"]["reassigned"] == 0


def test_vocab_json_and_unigram_tokenizers_compared(tmp_path):
    base = words(VOCAB)
    target = list(base)
    target[7] = "seven"
    unigram = {"model": {"type": "Unigram", "vocab": [[t, -1.0] for t in base]}, "added_tokens": []}
    paths = trio(tmp_path, tokenizers={"source_finetuned": {"tokenizer.json": unigram},  # the base has none
                                       "target_base": {"vocab.json": {t: i for i, t in enumerate(target)}}})
    report = inspect(paths)
    (entry,) = report["headers"]["tokenizer"]
    assert entry["source"] == "source_finetuned" and entry["reassigned"] == 1
    assert entry["examples"] == [{"id": 7, "source": "w7", "target": "seven"}]


def test_missing_or_unreadable_tokenizers_are_unknown(tmp_path):
    paths = trio(tmp_path, tokenizers={"source_base": {"tokenizer.json": "{not json"}})
    report = inspect(paths)
    r = reasons(report)["tokenizer_unknown"]
    assert r["verdict"] == "compatible" and report["verdict"] == "compatible"  # equal vocabulary sizes
    assert report["headers"]["tokenizer"][0]["status"] == "unknown"
    assert "unreadable" in r["message"] and "target_base" in r["message"]


# --- estimates ------------------------------------------------------------------------------------------

def test_estimates_agree_with_the_files(tmp_path):
    paths = make_trio(str(tmp_path), shape=SHAPE)
    T, S, F = (load_dir(paths[r]) for r in ("target_base", "source_base", "source_finetuned"))
    transferred = [n for n, t in T.items() if t.is_floating_point() and n in S and n in F]
    nbytes = {n: t.numel() * t.element_size() for n, t in T.items()}
    want_input = sum(nbytes.values()) + sum(x[n].numel() * x[n].element_size() for n in transferred for x in (S, F))
    # vocab: extend -> the embedding and lm_head take the fine-tune's added rows
    vocab_rows = {n: F[n].shape[0] for n in ("model.embed_tokens.weight", "lm_head.weight")}
    want_output = sum(b * vocab_rows[n] // T[n].shape[0] if n in vocab_rows else b for n, b in nbytes.items())
    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], "",
                           GraftOptions(shard_size="100KB"))
    settings = EngineSettings(block_bytes=32 << 10, prefetch_blocks=3)
    report = inspect_graft(request, level=Level.HEADERS, settings=settings).report
    est = report["estimates"]
    assert est["input_bytes"] == want_input and est["output_bytes"] == want_output
    assert est["shards"] == len(report["headers"]["plan"]["shards"]) > 1
    assert sum(s["bytes"] for s in report["headers"]["plan"]["shards"]) == want_output
    for kind in ("graft", "weights_pass"):
        m = est["memory"][kind]
        assert m["total"] == sum(v for k, v in m.items() if k != "total")
        assert 0 < m["input_buffers"] <= (3 + 1) * 3 * (32 << 10)  # read-ahead + computing, three inputs
    assert 0 < est["memory"]["graft"]["output_buffers"] <= 4 * (32 << 10)
    assert est["memory"]["weights_pass"]["output_buffers"] == 0
    assert est["weights_bytes_read"] <= est["graft_bytes_read"]
    t = est["time"]
    assert t["estimate"] is True and all(v > 0 for v in t["elements_per_second"].values())
    elements = sum(F[n][:T[n].shape[0]].numel() if n in vocab_rows else T[n].numel() for n in transferred)
    assert est["transferred_elements"] == elements
    assert t["graft_compute_seconds"] == pytest.approx(elements / t["elements_per_second"]["transfer"], abs=2e-3)
