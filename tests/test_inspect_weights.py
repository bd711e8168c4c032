"""graft inspect, level weights: every number against a float64 reference computed here from the files, each
input read once, the verdict on near, far, opposed and unrelated targets, the chart, cancellation."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import types

import pytest
from graft_helpers import HEAD, effective, load_dir

from worker.devtools.sample_models import LlamaShape, llama_state, make_trio, perturb, save_checkpoint
from worker.engine import GraftCancelled, GraftError, GraftOptions, GraftRequest
from worker.engine.checks.inspect import Level, inspect_graft
from worker.engine.checks.inspect import weights as weights_module
from worker.engine.config import EngineSettings
from worker.engine.planning.recipe import load_recipe
from worker.engine.storage.stores import LocalStore

SHAPE = LlamaShape(layers=3)
LAYER = re.compile(r"\.layers\.(\d+)\.")


# --- the float64 reference ------------------------------------------------------------------------------

def reference(target: str, base: str, finetuned: str) -> dict[str, dict]:
    """Per tensor the graft would transfer: float64 sums over the rows all three share. A tied target with
    untied sources gets an lm_head of its own (the output unties it): its embedding plus the heads' delta."""
    T, S, F = load_dir(target), load_dir(base), load_dir(finetuned)
    out = {}
    names = list(T) + ([HEAD] if HEAD not in T and HEAD in S and HEAD in F else [])
    for name in names:
        t = effective(T, name)
        if not t.is_floating_point():
            continue
        try:
            s, f = effective(S, name), effective(F, name)
        except KeyError:
            continue
        rows = min(t.shape[0], s.shape[0], f.shape[0])
        t, s, f = (x[:rows].double() for x in (t, s, f))
        d, b = f - s, t - s
        out[name] = {"target_sq": float((t * t).sum()), "delta_sq": float((d * d).sum()),
                     "bases_sq": float((b * b).sum()), "cross": float((b * d).sum()), "elements": t.numel(),
                     "ndim": t.dim()}
    return out


def ratios(s: dict) -> dict:
    t, d, b = math.sqrt(s["target_sq"]), math.sqrt(s["delta_sq"]), math.sqrt(s["bases_sq"])
    return {"bases_distance_ratio": b / t, "delta_ratio": d / t, "bases_to_delta_ratio": b / d if d else None,
            "cos_bases_delta": s["cross"] / (b * d) if b and d else None, "target_norm": t, "delta_norm": d,
            "bases_norm": b}


def close(got, want, *, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    if want is None:
        return got is None
    return got is not None and math.isclose(got, want, rel_tol=rel, abs_tol=abs_)


def pooled(ref: dict[str, dict]) -> dict:
    groups: dict = {}
    for name, s in ref.items():
        m = LAYER.search(name)
        g = groups.setdefault(int(m.group(1)) if m else None, {"target_sq": 0.0, "delta_sq": 0.0, "bases_sq": 0.0,
                                                               "cross": 0.0, "elements": 0, "tensors": 0})
        for k in ("target_sq", "delta_sq", "bases_sq", "cross", "elements"):
            g[k] += s[k]
        g["tensors"] += 1
    return groups


def target_float_parameters(target: str) -> int:
    return sum(t.numel() for t in load_dir(target).values() if t.is_floating_point())


def assert_diff_matches(entry: dict, ref: dict[str, dict], target: str) -> None:
    rows = {r["name"]: r for r in entry["tensors"]}
    assert set(rows) == set(ref)
    for name, s in ref.items():
        want, got = ratios(s), rows[name]
        assert got["elements"] == s["elements"], name
        for key, value in want.items():
            assert close(got[key], value, abs_=1e-5 if key.startswith("cos") else 1e-6), (name, key, got[key], value)
    layers = {g["layer"]: g for g in entry["layers"]}
    groups = pooled(ref)
    assert set(layers) == set(groups)
    for layer, g in groups.items():
        assert layers[layer]["tensors"] == g["tensors"] and layers[layer]["elements"] == g["elements"]
        for key, value in ratios(g).items():
            assert close(layers[layer][key], value, abs_=1e-5 if key.startswith("cos") else 1e-6), (layer, key)
    kept = [ratios(s) for s in ref.values() if s["ndim"] >= 2 and s["target_sq"] and s["delta_sq"]]
    for key in ("bases_distance_ratio", "delta_ratio", "bases_to_delta_ratio", "cos_bases_delta"):
        want = statistics.median(r[key] for r in kept)
        assert close(entry["medians"][key], want, abs_=1e-5), key
    assert entry["medians"]["tensors"] == len(kept)
    covered = sum(s["elements"] for name, s in ref.items() if name in load_dir(target))  # the target's own
    total = target_float_parameters(target)
    assert entry["coverage"]["covered_parameters"] == covered
    assert entry["coverage"]["target_parameters"] == total
    assert close(entry["coverage"]["share"], covered / total, rel=1e-12)


# --- models ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, str]:
    """make_trio's mix: added rows in the fine-tune, a target-only tensor, three shardings, float32 norms."""
    return make_trio(str(tmp_path_factory.mktemp("inspect_trio")), shape=SHAPE)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """A base, a fine-tune, and targets: near, far, opposed (moved against the fine-tune) and unrelated."""
    root = str(tmp_path_factory.mktemp("inspect_family"))
    base = llama_state(SHAPE, seed=10)
    ft = perturb(base, seed=11, scale=0.05)
    opposed = {n: (b.double() - 3 * (ft[n].double() - b.double())).to(b.dtype) for n, b in base.items()}
    states = {"base": base, "ft": ft, "near": perturb(base, seed=12, scale=0.05),
              "far": perturb(base, seed=13, scale=0.6), "opposed": opposed,
              "unrelated": llama_state(SHAPE, seed=99),
              "base2": perturb(base, seed=14, scale=0.02)}
    states["ft2"] = perturb(states["base2"], seed=15, scale=0.08)
    return {name: save_checkpoint(os.path.join(root, name), state, SHAPE.config()) for name, state in states.items()}


def plain(paths: dict[str, str], target: str | None = None) -> GraftRequest:
    return GraftRequest.single(paths.get("source_base") or paths["base"], paths.get("source_finetuned") or paths["ft"],
                        target or paths["target_base"], "")


def two_diffs(family: dict[str, str]) -> GraftRequest:
    recipe = load_recipe({"target_base": family["near"],
                          "diffs": [{"source_base": family["base"], "source_finetuned": family["ft"]},
                                    {"source_base": family["base2"], "source_finetuned": family["ft2"],
                                     "weight": 0.5}]})
    request = GraftRequest(recipe, "")
    assert request.recipe is not None
    return request


# --- every number ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 1000], ids=["chunk", "small-chunks"])
def test_weights_match_float64_reference(trio, monkeypatch, chunk):
    if chunk:  # chunks and blocks that cut tensors in many places
        monkeypatch.setattr(weights_module, "CHUNK", chunk)
    result = inspect_graft(plain(trio), level=Level.WEIGHTS, settings=EngineSettings(block_bytes=24 << 10))
    (entry,) = result.report["weights"]["diffs"]
    assert entry["source_base"].endswith(trio["source_base"])
    assert_diff_matches(entry, reference(trio["target_base"], trio["source_base"], trio["source_finetuned"]),
                        trio["target_base"])


@pytest.mark.parametrize("tied", [(True, True, False), (False, False, True), (True, True, True)])
def test_tied_layouts_against_the_reference(tmp_path, tied):
    paths = make_trio(str(tmp_path), shape=SHAPE, tied=tied)
    (entry,) = inspect_graft(plain(paths), level=Level.WEIGHTS).report["weights"]["diffs"]
    ref = reference(paths["target_base"], paths["source_base"], paths["source_finetuned"])
    assert (HEAD in ref) == (tied != (True, True, True))
    assert_diff_matches(entry, ref, paths["target_base"])


def test_each_diff_of_a_recipe_against_its_own_reference(family):
    result = inspect_graft(two_diffs(family), level=Level.WEIGHTS)
    diffs = result.report["weights"]["diffs"]
    assert [d["diff"] for d in diffs] == [0, 1]
    assert_diff_matches(diffs[0], reference(family["near"], family["base"], family["ft"]), family["near"])
    assert_diff_matches(diffs[1], reference(family["near"], family["base2"], family["ft2"]), family["near"])


@pytest.mark.parametrize("kind", ["plain", "recipe"])
def test_each_input_read_once(trio, family, monkeypatch, kind):
    """Every byte of tensor data read exactly once per model (a model shared by roles once), counted at the
    store; with no added rows and no target-only tensor, that is every tensor byte of every input."""
    reads: list[tuple[str, str, int, int]] = []
    original = LocalStore.stream_into

    def counting(self, name, start, view):
        reads.append((self.root, name, start, len(view)))
        return original(self, name, start, view)

    monkeypatch.setattr(LocalStore, "stream_into", counting)
    if kind == "plain":
        request = GraftRequest.single(family["base"], family["ft"], family["near"], "")
        dirs = [family["base"], family["ft"], family["near"]]
    else:
        request = two_diffs(family)
        dirs = [family[n] for n in ("near", "base", "ft", "base2", "ft2")]
    result = inspect_graft(request, level=Level.WEIGHTS, settings=EngineSettings(block_bytes=40 << 10))
    tensor_bytes = sum(t.numel() * t.element_size() for d in dirs for t in load_dir(d).values())
    assert sum(r[3] for r in reads) == tensor_bytes
    by_file: dict = {}
    for root, name, start, length in reads:
        by_file.setdefault((os.path.realpath(root), name), []).append((start, start + length))
    for ranges in by_file.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)), "a byte read twice"
    assert result.report["weights"]["bytes_read"] == tensor_bytes
    assert result.report["estimates"]["weights_bytes_read"] == tensor_bytes
    if kind == "plain":  # the plan's input bytes: the same tensors
        assert result.report["estimates"]["input_bytes"] == tensor_bytes


def test_headers_level_reads_no_tensor_data(trio, monkeypatch):
    def refuse(self, name, start, view):
        raise AssertionError("tensor data read at level headers")

    monkeypatch.setattr(LocalStore, "stream_into", refuse)
    result = inspect_graft(plain(trio), level=Level.HEADERS)
    assert result.report["levels_run"] == ["headers"] and "weights" not in result.report
    assert set(result.artifacts) == {"report.json"}


# --- the verdict ----------------------------------------------------------------------------------------

def _verdict(family, target: str) -> tuple[str, set[str], dict]:
    report = inspect_graft(GraftRequest.single(family["base"], family["ft"], family[target], ""),
                           level=Level.WEIGHTS).report
    return report["verdict"], {r["code"] for r in report["reasons"] if r["verdict"] != "compatible"}, report


def test_near_target_compatible_unrelated_incompatible(family):
    verdict, codes, report = _verdict(family, "near")
    assert (verdict, codes) == ("compatible", set())
    assert report["weights"]["diffs"][0]["medians"]["bases_distance_ratio"] < 0.25
    verdict, codes, report = _verdict(family, "unrelated")
    assert verdict == "incompatible" and "bases_unrelated" in codes
    ratio = report["weights"]["diffs"][0]["medians"]["bases_distance_ratio"]
    assert 1.2 < ratio < 1.6  # independent inits: about sqrt(2)
    (r,) = [r for r in report["reasons"] if r["code"] == "bases_unrelated"]
    assert r["level"] == "weights" and r["values"]["bases_distance_ratio"] == ratio
    assert r["thresholds"]["incompatible"] < ratio


def test_far_and_opposed_targets_risky(family):
    verdict, codes, _ = _verdict(family, "far")
    assert (verdict, codes) == ("risky", {"bases_far"})
    verdict, codes, report = _verdict(family, "opposed")
    assert verdict == "risky" and "target_moved_against_finetune" in codes
    assert report["weights"]["diffs"][0]["medians"]["cos_bases_delta"] < -0.99


def test_low_coverage_risky(family):
    request = GraftRequest.single(family["base"], family["ft"], family["near"], "",
                                  GraftOptions(include=[r"layers\.0\.self_attn\.q_proj"]))
    report = inspect_graft(request, level=Level.WEIGHTS).report
    entry = report["weights"]["diffs"][0]
    q = SHAPE.hidden * SHAPE.hidden
    assert entry["coverage"]["covered_parameters"] == q
    assert report["verdict"] == "risky" and [r["code"] for r in report["reasons"]
                                             if r["verdict"] != "compatible"] == ["low_coverage"]


def test_recipe_verdict_is_the_worst_over_its_diffs(family):
    recipe = load_recipe({"target_base": family["near"],
                          "diffs": [{"source_base": family["base"], "source_finetuned": family["ft"]},
                                    {"source_base": family["unrelated"], "source_finetuned": family["ft"]}]})
    report = inspect_graft(GraftRequest(recipe, ""), level=Level.WEIGHTS).report
    assert report["verdict"] == "incompatible"
    bad = [r for r in report["reasons"] if r["code"] == "bases_unrelated"]
    assert [r["values"]["diff"] for r in bad] == ["diff 1"]


# --- the report, the chart, progress, cancellation -------------------------------------------------------

def test_report_json_and_chart(trio):
    seen = []
    result = inspect_graft(plain(trio), level=Level.WEIGHTS, progress=seen.append)
    assert json.loads(result.artifacts["report.json"]) == json.loads(json.dumps(result.report, allow_nan=False))
    png = result.artifacts["layers.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert 5_000 < len(png) < 100_000
    phases = [p.phase for p in seen]
    assert phases[0] == "resolving" and phases[-1] == "done" and "inspecting" in phases and "streaming" not in phases
    inspecting = [p for p in seen if p.phase == "inspecting" and p.bytes_total]
    assert inspecting[-1].bytes_read == inspecting[-1].bytes_total == result.report["weights"]["bytes_read"]
    assert inspecting[-1].fraction == 1.0  # an inspection's progress is its reads


def test_cancelled_between_blocks(trio):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    seen = []
    with pytest.raises(GraftCancelled):
        inspect_graft(plain(trio), level=Level.WEIGHTS, settings=EngineSettings(block_bytes=8 << 10),
                      should_cancel=cancel, progress=seen.append)
    streamed = [p for p in seen if p.phase == "inspecting" and p.bytes_total]
    assert streamed and streamed[-1].bytes_read < streamed[-1].bytes_total


# --- the function level's place in the verdict ------------------------------------------------------------

def fake_probe(monkeypatch, barrier_ratio: float | None, *, refuse: str | None = None) -> list[dict]:
    """function_probe replaced (the real one is tested with the evaluation): what it was called with."""
    calls: list[dict] = []

    def function_probe(source_base, target_base, tokenizer_from, *, text, settings, device="cpu",
                       should_cancel=None):
        calls.append({"source_base": source_base.uri, "target_base": target_base.uri, "text": text,
                      "device": device})
        if refuse:
            raise GraftError(refuse, "the bases' configs differ")
        # An overflowed loss: strict JSON has no Infinity, the report says null there.
        return {"lambdas": [0, 0.25, 0.5, 0.75, 1], "losses": [2.0, 2.1, math.inf, 2.1, 2.0],
                "barrier": 2.0 * barrier_ratio, "barrier_ratio": barrier_ratio, "tokens": 100,
                "probe": "user", "seconds": 0.1}

    module = types.ModuleType("worker.engine.checks.inspect.function")
    module.function_probe = function_probe
    monkeypatch.setitem(sys.modules, "worker.engine.checks.inspect.function", module)
    return calls


@pytest.mark.parametrize(("ratio", "verdict"), [(0.01, "risky"), (0.05, "risky"), (0.5, "incompatible")])
def test_function_level_overrules_weights_connectivity(family, monkeypatch, ratio, verdict):
    """No barrier overrules "unrelated" down to risky (not to compatible: the weights still moved far); a
    barrier is incompatible on its own."""
    calls = fake_probe(monkeypatch, ratio)
    request = GraftRequest.single(family["base"], family["ft"], family["unrelated"], "")
    report = inspect_graft(request, level=Level.FUNCTION, probe_text="some text").report
    assert report["levels_run"] == ["headers", "weights", "function"]
    assert report["verdict"] == verdict
    assert calls == [{"source_base": "file://" + family["base"], "target_base": "file://" + family["unrelated"],
                      "text": "some text", "device": calls[0]["device"]}]
    assert report["function"]["barrier_ratio"] == ratio and report["function"]["losses"][2] is None
    codes = {r["code"]: r for r in report["reasons"]}
    unrelated = codes["bases_unrelated"]
    assert unrelated["overruled"] is True and unrelated["verdict"] == "risky"  # still listed, capped
    assert unrelated["weights_verdict"] == "incompatible"
    barrier = codes["loss_barrier"]
    assert barrier["verdict"] == {0.01: "compatible", 0.05: "risky", 0.5: "incompatible"}[ratio]
    assert barrier["values"]["barrier_ratio"] == ratio


def test_headers_incompatibility_stands_against_the_function_level(family, monkeypatch, tmp_path):
    fake_probe(monkeypatch, 0.0)
    config = {**SHAPE.config(), "model_type": "mistral"}
    other = save_checkpoint(str(tmp_path / "mistral"), load_dir(family["near"]), config)
    report = inspect_graft(GraftRequest.single(family["base"], family["ft"], other, ""), level=Level.FUNCTION).report
    assert report["verdict"] == "incompatible"
    (r,) = [r for r in report["reasons"] if r["verdict"] == "incompatible"]
    assert r["code"] == "architecture_mismatch" and not r.get("overruled")


def test_function_level_not_defined_leaves_the_weights_verdict(family, monkeypatch):
    fake_probe(monkeypatch, None, refuse="config_mismatch")
    report = inspect_graft(GraftRequest.single(family["base"], family["ft"], family["unrelated"], ""),
                           level=Level.FUNCTION).report
    assert report["levels_run"] == ["headers", "weights"] and report["verdict"] == "incompatible"
    assert report["function"]["error"]["code"] == "config_mismatch"
    assert "function_level_not_run" in {r["code"] for r in report["reasons"]}


def test_function_level_errors_are_raised(family, monkeypatch):
    fake_probe(monkeypatch, None, refuse="eval_timeout")
    with pytest.raises(GraftError) as err:
        inspect_graft(GraftRequest.single(family["base"], family["ft"], family["near"], ""), level=Level.FUNCTION)
    assert err.value.code == "eval_timeout"


def test_function_level_through_the_real_probe(tmp_path):
    """The wiring to evaluation's function_probe, once for real: a copy of the source base whose embedding and
    head are turned by one rotation computes the same function with other weights. The weights level sees a
    near target (the layers did not move), the loss along the line shows the barrier, and it decides."""
    from eval_helpers import bigram_state, encode, save, tokenizer_files

    text = "the quick brown fox jumps over the lazy dog. " * 8
    base = bigram_state(encode(text), seed=1)
    paths = {name: save(str(tmp_path / name), state, tokenizer=tokenizer_files()) for name, state in (
        ("base", base), ("ft", perturb(base, seed=2, scale=0.05)),
        ("rotated", bigram_state(encode(text), seed=1, rotation_seed=5)))}
    report = inspect_graft(GraftRequest.single(paths["base"], paths["ft"], paths["rotated"], ""), level=Level.FUNCTION,
                           probe_text=text).report
    assert report["levels_run"] == ["headers", "weights", "function"]
    function = report["function"]
    assert function["probe"] == "user" and len(function["losses"]) == 5
    line = [(1 - lam) * function["losses"][0] + lam * function["losses"][-1] for lam in function["lambdas"]]
    barrier = max(loss - on_line for loss, on_line in zip(function["losses"], line, strict=True))
    assert function["barrier"] == pytest.approx(barrier, abs=1e-9) and barrier > 0
    ratio = barrier / ((function["losses"][0] + function["losses"][-1]) / 2)
    assert function["barrier_ratio"] == pytest.approx(ratio, rel=1e-9) and ratio > 0.10
    assert report["verdict"] == "incompatible"
    assert [r["code"] for r in report["reasons"] if r["verdict"] == "incompatible"] == ["loss_barrier"]


def test_a_probe_overrules_only_the_diffs_of_its_own_base(family, monkeypatch):
    """Two diffs with their own bases, both unrelated to the target: the first base's probe finds no barrier,
    the second's cannot run. Only the first diff's `bases_unrelated` is overruled (to risky); the second's
    stands, and the first probe is kept."""
    def function_probe(source_base, target_base, tokenizer_from, *, text, settings, device="cpu",
                       should_cancel=None):
        if source_base.uri.endswith("/base2"):
            raise GraftError("config_mismatch", "the bases' configs differ")
        return {"lambdas": [0, 0.25, 0.5, 0.75, 1], "losses": [2.0, 2.0, 2.0, 2.0, 2.0], "barrier": 0.0,
                "barrier_ratio": 0.0, "tokens": 100, "probe": "user", "seconds": 0.1}

    module = types.ModuleType("worker.engine.checks.inspect.function")
    module.function_probe = function_probe
    monkeypatch.setitem(sys.modules, "worker.engine.checks.inspect.function", module)
    recipe = load_recipe({"target_base": family["unrelated"],
                          "diffs": [{"source_base": family["base"], "source_finetuned": family["ft"]},
                                    {"source_base": family["base2"], "source_finetuned": family["ft2"]}]})
    report = inspect_graft(GraftRequest(recipe, ""), level=Level.FUNCTION).report
    unrelated = {r["values"]["diff_index"]: r for r in report["reasons"] if r["code"] == "bases_unrelated"}
    assert unrelated[0]["overruled"] is True and unrelated[0]["verdict"] == "risky"
    assert not unrelated[1].get("overruled") and unrelated[1]["verdict"] == "incompatible"
    assert report["verdict"] == "incompatible" and "function" in report["levels_run"]
    probes = report["function"]["probes"]
    assert [("skipped" in p) for p in probes] == [False, True] and report["function"]["barrier_ratio"] == 0.0
