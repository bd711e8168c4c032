"""Recipes (several diffs, per-diff transforms, merges, per-layer weights, rules) against references written
here in float64 from the documented formulas, never by calling the engine's methods: each method alone and
merged, exact magnitude thresholds through ties and block boundaries, DARE's draw recomputed from its
documented hash, plain recipes writing today's bytes, and bad recipes refused before any data is read."""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import pytest
import torch
import yaml
from graft_helpers import EMBED, HEAD, correctly_rounded, documented_draw, graft, load_dir, read_json, ulp, ulp_error

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.planning.recipe import load_recipe
from worker.service.settings import Settings

LAYERS = 3
VOCAB = 256
ADDED = 8  # rows both fine-tunes add to the vocabulary


# --- models ---------------------------------------------------------------------------------------------

def _family(root: str, dtype: torch.dtype) -> dict[str, str]:
    """One base, two fine-tunes of it (both adding the same ADDED rows), a drifted target, and two misfits:
    a fine-tune adding other rows (vocab_mismatch) and one of another MLP width (shape_conflict)."""
    shape = LlamaShape(layers=LAYERS)
    base = llama_state(shape, seed=100, dtype=dtype)
    states = {
        "base": (base, VOCAB, shape),
        "ft_a": (perturb(base, seed=101, extra_rows=ADDED), VOCAB + ADDED, shape),
        "ft_b": (perturb(base, seed=102, extra_rows=ADDED), VOCAB + ADDED, shape),
        "target": (perturb(base, seed=103, scale=0.2), VOCAB, shape),
        "ft_rows": (perturb(base, seed=104, extra_rows=4), VOCAB + 4, shape),
    }
    wide = LlamaShape(layers=LAYERS, intermediate=96)
    states["ft_wide"] = (perturb(llama_state(wide, seed=100, dtype=dtype), seed=105), VOCAB, wide)
    return {name: save_checkpoint(os.path.join(root, name), state, s.config(vocab=vocab))
            for name, (state, vocab, s) in states.items()}


@pytest.fixture(scope="module")
def f32(tmp_path_factory) -> dict[str, str]:
    """Float32 everywhere: the engine's float32 accumulation is checked tightly against float64."""
    return _family(str(tmp_path_factory.mktemp("recipes_f32")), torch.float32)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> dict[str, str]:
    """bf16 matrices (float32 norms): deltas are exact in float32 and many magnitudes are equal."""
    return _family(str(tmp_path_factory.mktemp("recipes_bf16")), torch.bfloat16)


def _quantized(root: str) -> dict[str, str]:
    """float32 models on a grid of 2**-12 whose deltas take seven values: nearly every magnitude is tied, and
    every sum the engine forms is exact in float32 (the output must equal the reference bit for bit)."""
    shape = LlamaShape(layers=2)
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randint(-512, 512, t.shape, generator=g).float() * 2**-12
            for n, t in llama_state(shape, seed=0, dtype=torch.float32).items()}

    def moved(spread: int) -> dict[str, torch.Tensor]:
        return {n: t + torch.randint(-spread, spread + 1, t.shape, generator=g).float() * 2**-12
                for n, t in base.items()}

    states = {"base": base, "ft_a": moved(3), "ft_b": moved(3), "target": moved(40)}
    return {name: save_checkpoint(os.path.join(root, name), st, shape.config()) for name, st in states.items()}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, str]:
    return _quantized(str(tmp_path_factory.mktemp("recipes_quantized")))


# --- the reference ----------------------------------------------------------------------------------------

def _rank_window(delta: np.ndarray, low: int, high: int) -> np.ndarray:
    """Elements whose descending-|delta| rank (ties: lower index first) lies in [low, high). Magnitudes are
    compared as the float32 the engine accumulates in (for bf16 and float32 inputs, the exact delta rounded
    once)."""
    mag = np.abs(delta.astype(np.float32)).astype(np.float64)
    order = np.lexsort((np.arange(delta.size), -mag))
    keep = np.zeros(delta.size, dtype=bool)
    keep[order[low:high]] = True
    return keep


def _dare_keep(seed: int, index: int, name: str, n: int, drop: float) -> np.ndarray:
    """Kept iff the documented draw (graft_helpers.documented_draw) is >= drop * 2**32."""
    return documented_draw(seed, index, name, n) >= np.uint64(int(drop * 2**32))


def _transform(delta: np.ndarray, spec: dict | None, index: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(transformed delta, kept mask) of one diff of one tensor."""
    n = delta.size
    if spec is None:
        return delta, np.ones(n, dtype=bool)
    method = spec["method"]
    if method == "magnitude":
        keep = _rank_window(delta, 0, min(n, max(1, int(spec["density"] * n))))
        return np.where(keep, delta, 0.0), keep
    if method == "breadcrumbs":
        top = min(n, int(spec.get("gamma", 0.01) * n))
        keep = _rank_window(delta, top, min(n, top + int(spec["density"] * n)))
        return np.where(keep, delta, 0.0), keep
    if method == "dare":
        if spec["drop"] == 0:
            return delta, np.ones(n, dtype=bool)
        keep = _dare_keep(spec.get("seed", 0), index, name, n, spec["drop"])
        return np.where(keep, delta / (1.0 - spec["drop"]), 0.0), keep
    raise AssertionError(method)


def _position(name: str) -> float:
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match is None:
        return 0.0 if "embed" in name else 1.0
    return int(match.group(1)) / (LAYERS - 1)


def _weight(weight, position: float) -> float:
    if not isinstance(weight, list):
        return float(weight)
    if len(weight) == 1:
        return float(weight[0])
    return float(np.interp(position, np.linspace(0.0, 1.0, len(weight)), weight))


EPS32 = 2**-24
VOTE_ROUNDINGS = 8  # float32 roundings a weighted delta and the vote's sum may take


def _merge(t: np.ndarray, deltas: list[np.ndarray], weights: list[float], spec: dict) -> dict:
    """In float64: `values` (t + merged delta), `alt` (the same where the sign vote is too close to call in
    float32 arithmetic, elected the other way), `bound` (the magnitudes summed: the float32 tolerance) and,
    for ties, the sign agreement and how many elements had a vote too close to call."""
    lam = spec.get("lambda", 1.0)
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    mass = sum(np.abs(x) for x in weighted)
    if spec["method"] == "sum":
        total = sum(weighted)
        if spec.get("normalize", False) and sum(weights):
            total, mass = total / sum(weights), mass / abs(sum(weights))
        values = t + lam * total
        return {"values": values, "alt": values, "bound": np.abs(t) + abs(lam) * mass, "sign_agreement": None,
                "zero_votes": 0}
    total = sum(weighted)
    # A sum within float32 rounding of 0 may take either sign in the engine (a float64 0 is often itself a
    # rounding: 0.9 * d0 + 0.4 * d1 with d1 = -2.25 * d0); both elections are accepted there, nowhere else.
    close = (np.abs(total) <= VOTE_ROUNDINGS * EPS32 * mass) & (mass > 0)

    def elect(majority: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        joins = [(x != 0) & (np.sign(x) == majority) for x in weighted]
        merged = sum(np.where(j, x, 0.0) for j, x in zip(joins, weighted, strict=True))
        bound = mass
        if spec.get("normalize", True):
            divisor = sum(w * j for w, j in zip(weights, joins, strict=True))
            divisor = np.where(divisor == 0, 1.0, divisor)
            merged, bound = merged / divisor, mass / np.abs(divisor)
        return t + lam * merged, np.abs(t) + abs(lam) * bound, joins

    majority = np.where(total >= 0, 1.0, -1.0)  # 0 counts as +
    values, bound, joins = elect(majority)
    alt, alt_bound, _ = elect(np.where(close, -majority, majority))
    voters = sum((x != 0).astype(int) for x in weighted) > 0
    unanimous = voters & np.logical_and.reduce([j | (x == 0) for j, x in zip(joins, weighted, strict=True)])
    return {"values": values, "alt": alt, "bound": np.maximum(bound, alt_bound),
            "sign_agreement": float(unanimous.sum() / voters.sum()) if voters.any() else None,
            "close_votes": float(close.sum() / max(1, voters.sum())), "zero_votes": int(((total == 0) & voters).sum())}


def _default_transform(merge: dict) -> dict | None:
    if merge["method"] == "ties" and merge.get("density", 1.0) < 1:
        return {"method": "magnitude", "density": merge["density"]}
    if merge["method"] == "dare_ties" and merge["density"] < 1:
        return {"method": "dare", "drop": 1.0 - merge["density"], "seed": merge.get("seed", 0)}
    return None


def expected(recipe: dict) -> dict[str, dict]:
    """Per output tensor: `values` (float64), `bound` (magnitudes summed, for the float32 tolerance) and, for
    merged tensors, the manifest's record (`diffs`: weight, transform, kept fraction; `sign_agreement`)."""
    target = load_dir(recipe["target_base"])
    pairs = [(load_dir(d["source_base"]), load_dir(d["source_finetuned"])) for d in recipe["diffs"]]
    merge = recipe.get("merge", {"method": "sum"})
    out = {}
    for name, t in target.items():
        t64 = t.double().reshape(-1).numpy()
        if any(name not in s or name not in f for s, f in pairs):  # a tensor of the target's own: copied
            values = t.double().numpy()
            out[name] = {"values": values, "alt": values, "bound": np.abs(values), "diffs": None}
            continue
        n = t64.size  # every diff shares the target's rows; the fine-tunes' extra rows come after them
        rule = next((r for r in recipe.get("rules", []) if re.search(r["match"], name)), None)
        deltas, weights, report = [], [], []
        for i, ((s, f), diff) in enumerate(zip(pairs, recipe["diffs"], strict=True)):
            delta = (f[name].double().reshape(-1)[:n] - s[name].double().reshape(-1)[:n]).numpy()
            spec = (rule or {}).get("transform") or diff.get("transform") or _default_transform(merge)
            weight = (rule or {}).get("weight", diff.get("weight", 1.0))
            delta, keep = _transform(delta, spec, i, name)
            deltas.append(delta)
            weights.append(_weight(weight, _position(name)))
            report.append({"weight": weights[-1], "transform": spec, "kept_fraction": round(keep.sum() / n, 6)})
        made = _merge(t64, deltas, weights, merge)
        first = pairs[0][1][name].double()
        shape = (first.shape[0], *t.shape[1:]) if first.dim() else t.shape
        for key in ("values", "alt", "bound"):
            if first.shape[0] > t.shape[0]:  # the added vocabulary rows, from the first diff's fine-tune
                rows = first[t.shape[0]:].reshape(-1).numpy()
                made[key] = np.concatenate([made[key], np.abs(rows) if key == "bound" else rows])
            made[key] = made[key].reshape(shape)
        out[name] = {**made, "diffs": report}
    return out


def _within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Whether each element is the output dtype's rounding of a value within the float32 accumulation's error
    of the reference (rounding is monotonic: the bracket's ends rounded once)."""
    tol = VOTE_ROUNDINGS * EPS32 * bound
    if out.dtype == torch.float32:
        return (out.double() - ref).abs() <= tol
    low, high = correctly_rounded(ref - tol, out.dtype), correctly_rounded(ref + tol, out.dtype)
    return (out >= low) & (out <= high)


def assert_output(output: str, want: dict[str, dict], *, exact: bool = False) -> dict[str, torch.Tensor]:
    """Exact: bit for bit. Else float32 outputs within a few float32 roundings of the magnitudes summed (a kept
    or dropped element moves an output by its whole delta, far beyond that), and bf16/f16 outputs the rounding
    of such a value: within 1 ulp, and the correctly rounded reference but for rare double roundings."""
    got = load_dir(output)
    assert set(got) == set(want)
    rounded = wrong = 0
    for name, w in want.items():
        out, ref, alt = got[name], torch.from_numpy(w["values"]), torch.from_numpy(w["alt"])
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        if exact:
            assert torch.equal(out.double(), ref), name
            continue
        bound = torch.from_numpy(w["bound"])
        ok = _within(out, ref, bound) | _within(out, alt, bound)
        assert bool(ok.all()), (name, torch.nonzero(~ok)[:5].tolist())
        if out.dtype != torch.float32:
            # Where the accumulation's error is below half an ulp (all but cancellations to near 0): 1 ulp.
            fine = VOTE_ROUNDINGS * EPS32 * bound <= ulp(ref, out.dtype) / 2
            error = torch.minimum(ulp_error(out, ref), ulp_error(out, alt))
            assert float(error[fine].max()) <= 1.0, name
            rounded += out.numel()
            wrong += int(((out != correctly_rounded(ref, out.dtype))
                          & (out != correctly_rounded(alt, out.dtype))).sum())
    assert wrong <= 1e-3 * rounded, (wrong, rounded)
    return got


def assert_manifest(manifest: dict, recipe: dict, want: dict[str, dict]) -> None:
    assert manifest["recipe"] == load_recipe(recipe).to_dict()  # the whole recipe, defaults filled in
    for name, w in want.items():
        if w["diffs"] is None:
            assert manifest["tensors"][name]["action"] == "copied" and "merge" not in manifest["tensors"][name]
            continue
        record = manifest["tensors"][name]["merge"]
        assert record["method"] == recipe.get("merge", {"method": "sum"})["method"], name
        assert [d["diff"] for d in record["diffs"]] == list(range(len(recipe["diffs"]))), name
        for got, ref in zip(record["diffs"], w["diffs"], strict=True):
            assert got["weight"] == pytest.approx(ref["weight"], abs=1e-12), name
            assert got["kept_fraction"] == ref["kept_fraction"], (name, got, ref)
            if ref["transform"] is None:
                assert got["transform"] is None, name
            else:
                assert {k: got["transform"][k] for k in ref["transform"]} == pytest.approx(ref["transform"]), name
        if w["sign_agreement"] is not None:
            slack = w["close_votes"] + 1e-6  # a vote too close to call may go either way
            assert record["sign_agreement"] == pytest.approx(w["sign_agreement"], abs=slack), name
        else:
            assert "sign_agreement" not in record, name


def run_recipe(recipe: dict, output, *, progress=None, **settings) -> object:
    request = GraftRequest(load_recipe(recipe), str(output))
    assert request.recipe is not None
    return run_graft(request, settings=Settings(**settings), progress=progress)


def recipe_of(models: dict[str, str], merge: dict | None = None, diffs: tuple = ({}, {}), **extra) -> dict:
    out = {"target_base": models["target"],
           "diffs": [{"source_base": models["base"], "source_finetuned": models[("ft_a", "ft_b")[i]], **d}
                     for i, d in enumerate(diffs)], **extra}
    if merge is not None:
        out["merge"] = merge
    return out


def output_bytes(directory) -> dict[str, bytes]:
    """Every file a graft wrote but the manifest and README (they name the recipe, the timings)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name not in ("graft-manifest.json", "README.md"):
            with open(os.path.join(directory, name), "rb") as fh:
                out[name] = fh.read()
    return out


# --- 1. each method, alone and merged, against the float64 reference ----------------------------------

CASES = {
    "magnitude": ({"method": "sum"}, ({"weight": 0.7, "transform": {"method": "magnitude", "density": 0.3}},), {}),
    "breadcrumbs": (None, ({"transform": {"method": "breadcrumbs", "density": 0.4, "gamma": 0.05}},), {}),
    # The norms' 64 elements: int(0.01 * 64) = 0 kept below the 3 outliers dropped, an empty window.
    "breadcrumbs_empty_window": (None, ({"transform": {"method": "breadcrumbs", "density": 0.01, "gamma": 0.05}},),
                                 {}),
    "dare": (None, ({"weight": 1.5, "transform": {"method": "dare", "drop": 0.7, "seed": 11}},), {}),
    "sum_two_layer_weights": ({"method": "sum", "normalize": True, "lambda": 0.8},
                              ({"weight": [0.2, 1.0]}, {"weight": [1.0, 0.0, 0.5]}), {}),
    "ties": ({"method": "ties", "density": 0.4}, ({"weight": 1.0}, {"weight": [0.3, 1.0]}), {}),
    "ties_unnormalized_own_transform": (
        {"method": "ties", "density": 0.5, "normalize": False, "lambda": 1.3},
        ({"transform": {"method": "dare", "drop": 0.4, "seed": 5}}, {"weight": 0.6}), {}),
    "ties_rules": ({"method": "ties", "density": 0.3}, ({}, {"weight": [0.5, 1.0]}),
                   {"rules": [{"match": "embed_tokens|lm_head", "weight": 0.0},
                              {"match": r"\.mlp\.", "transform": {"method": "breadcrumbs", "density": 0.2}},
                              {"match": "layers", "weight": [2.0, -1.0]}]}),
    "dare_ties": ({"method": "dare_ties", "density": 0.6, "seed": 3}, ({"weight": 0.9}, {"weight": 0.4}), {}),
    "dare_ties_unnormalized": ({"method": "dare_ties", "density": 0.3, "normalize": False}, ({}, {}), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_matches_float64_reference(f32, tmp_path, case):
    merge, diffs, extra = CASES[case]
    recipe = recipe_of(f32, merge, diffs, **extra)
    result = run_recipe(recipe, tmp_path / "out")
    want = expected(recipe)
    got = assert_output(str(tmp_path / "out"), want)
    assert_manifest(result.manifest, recipe, want)
    # The vocabulary-extended tensors: the first fine-tune's added rows, and the merge over the shared rows.
    assert got[EMBED].shape[0] == got[HEAD].shape[0] == VOCAB + ADDED
    assert result.manifest["tensors"][EMBED]["action"] == "vocab_extended"
    assert read_json(str(tmp_path / "out" / "config.json"))["vocab_size"] == VOCAB + ADDED
    target = load_dir(f32["target"])
    assert any(not torch.equal(got[n][:VOCAB] if n in (EMBED, HEAD) else got[n], t) for n, t in target.items())


@pytest.mark.parametrize("case", ["ties", "dare_ties", "sum_two_layer_weights", "breadcrumbs"])
def test_bf16_outputs_are_the_correctly_rounded_reference(bf16, tmp_path, case):
    merge, diffs, extra = CASES[case]
    recipe = recipe_of(bf16, merge, diffs, **extra)
    result = run_recipe(recipe, tmp_path / "out")
    want = expected(recipe)
    got = assert_output(str(tmp_path / "out"), want)
    assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert got["model.norm.weight"].dtype == torch.float32
    assert_manifest(result.manifest, recipe, want)


def test_bf16_inputs_to_float32_output(bf16, tmp_path):
    """Exact bf16 deltas and a float32 output: the tight check on the models with the most ties."""
    recipe = recipe_of(bf16, {"method": "ties", "density": 0.25}, ({}, {"weight": [0.3, 1.0]}),
                       options={"dtype": "float32"})
    result = run_recipe(recipe, tmp_path / "out")
    want = expected(recipe)
    got = assert_output(str(tmp_path / "out"), want)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_manifest(result.manifest, recipe, want)


# --- 2. thresholds exact through ties and block boundaries; the same bytes on every path ---------------

def _whole_pieces(monkeypatch) -> None:
    """The accelerator's way (each piece at once) on the CPU."""
    from worker.engine.compute import stream
    from worker.engine.compute.arithmetic import Arithmetic

    monkeypatch.setattr(stream, "Arithmetic", functools.partial(Arithmetic, whole_pieces=True))


def _small_chunks(monkeypatch) -> None:
    """Many CPU chunks per piece, in both passes: the tie counters carry across chunk boundaries too."""
    from worker.engine.compute import merge_kernel

    monkeypatch.setattr(merge_kernel, "CHUNK", 1000)  # the compute pass's and the statistics passes' chunks


# Weights that keep every product, sum and division exact on the 2**-12 grid: the output must be the reference
# bit for bit, and votes of exactly 0 (d_a = -d_b) must elect +.
THRESHOLD_CASES = {
    "magnitude": (None, ({"transform": {"method": "magnitude", "density": 0.37}},), (0.37,)),
    "breadcrumbs": (None, ({"transform": {"method": "breadcrumbs", "density": 0.3, "gamma": 0.11}},), (0.11, 0.41)),
    "ties": ({"method": "ties", "density": 0.45}, ({"weight": 0.5}, {"weight": 0.5}), (0.45,)),
    "ties_unnormalized": ({"method": "ties", "density": 0.6, "normalize": False, "lambda": 2.0},
                          ({}, {"weight": 0.25}), (0.6,)),
}


@pytest.mark.parametrize("case", sorted(THRESHOLD_CASES))
def test_thresholds_exact_with_ties_and_across_blocks(quantized, tmp_path, monkeypatch, case):
    merge, diffs, cuts = THRESHOLD_CASES[case]
    recipe = recipe_of(quantized, merge, diffs)
    # Each cut falls inside a class of equal magnitudes in every matrix: which are kept is the tie order.
    base = load_dir(quantized["base"])
    for name, d in load_dir(quantized["ft_a"]).items():
        mags = (d.double() - base[name].double()).abs().reshape(-1).sort(descending=True).values
        for cut in cuts if d.dim() == 2 else ():
            k = int(cut * mags.numel())
            assert mags[k - 1] == mags[k], name
    want = expected(recipe)
    if case == "ties":  # equal weights: d_a = -d_b, both kept, is a vote of exactly 0
        assert sum(w["zero_votes"] for w in want.values() if w["diffs"]) > 100
    result = run_recipe(recipe, tmp_path / "default")
    assert_output(str(tmp_path / "default"), want, exact=True)
    assert_manifest(result.manifest, recipe, want)
    with monkeypatch.context() as patch:
        _small_chunks(patch)
        run_recipe(recipe, tmp_path / "small", block_bytes=4096)
    with monkeypatch.context() as patch:
        _whole_pieces(patch)
        run_recipe(recipe, tmp_path / "whole", block_bytes=4096)
    reference = output_bytes(tmp_path / "default")
    assert output_bytes(tmp_path / "small") == reference
    assert output_bytes(tmp_path / "whole") == reference


@pytest.mark.parametrize("case", ["ties_rules", "dare_ties", "ties_unnormalized_own_transform"])
def test_same_bytes_whatever_the_block_size_or_path(bf16, tmp_path, monkeypatch, case):
    """bf16 deltas (many equal magnitudes) split over 4 KB blocks and small chunks, and whole pieces as an
    accelerator takes them: the same thresholds, the same DARE draws, the same bytes."""
    merge, diffs, extra = CASES[case]
    recipe = recipe_of(bf16, merge, diffs, **extra)
    run_recipe(recipe, tmp_path / "default")
    with monkeypatch.context() as patch:
        _small_chunks(patch)
        run_recipe(recipe, tmp_path / "small", block_bytes=4096, prefetch_blocks=1)
    with monkeypatch.context() as patch:
        _whole_pieces(patch)
        run_recipe(recipe, tmp_path / "whole", block_bytes=4096)
    reference = output_bytes(tmp_path / "default")
    assert output_bytes(tmp_path / "small") == reference
    assert output_bytes(tmp_path / "whole") == reference


def test_dare_keeps_about_one_minus_drop(f32, tmp_path):
    drop = 0.8
    recipe = recipe_of(f32, None, ({"transform": {"method": "dare", "drop": drop, "seed": 123}},))
    result = run_recipe(recipe, tmp_path / "out")
    kept = total = 0
    for name, entry in result.manifest["tensors"].items():
        n = int(np.prod(entry["shape"])) if name not in (EMBED, HEAD) else VOCAB * entry["shape"][1]
        fraction = entry["merge"]["diffs"][0]["kept_fraction"]
        sigma = (drop * (1 - drop) / n) ** 0.5
        assert abs(fraction - (1 - drop)) <= 5 * sigma + 1e-6, (name, fraction)
        kept += fraction * n
        total += n
    assert abs(kept / total - (1 - drop)) <= 5 * (drop * (1 - drop) / total) ** 0.5
    # Another seed draws other elements; the same seed, the same ones (test above: whatever the blocks).
    other = recipe_of(f32, None, ({"transform": {"method": "dare", "drop": drop, "seed": 124}},))
    run_recipe(other, tmp_path / "other")
    a, b = load_dir(str(tmp_path / "out")), load_dir(str(tmp_path / "other"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(a[name], b[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize("case", ["ties_rules", "dare_ties", "sum_two_layer_weights"])
def test_cuda_writes_the_cpu_bytes(bf16, tmp_path, case):
    merge, diffs, extra = CASES[case]
    recipe = recipe_of(bf16, merge, diffs, **extra)
    run_recipe(recipe, tmp_path / "cpu")
    on_gpu = {**recipe, "options": {**recipe.get("options", {}), "device": "cuda"}}
    run_recipe(on_gpu, tmp_path / "cuda")
    assert output_bytes(tmp_path / "cuda") == output_bytes(tmp_path / "cpu")


# --- 3. a plain recipe is today's graft ------------------------------------------------------------------

PLAIN_YAML = """
target_base: {target_base}
diffs:
  - source_base: {source_base}
    source_finetuned: {source_finetuned}
    weight: 0.5
merge: {{method: sum}}
options: {{vocab: extend, dtype: auto, shard_size: 5GB}}
"""


def test_plain_recipe_writes_todays_bytes(trio, tmp_path):
    graft(trio, tmp_path / "flags", alpha=0.5)
    recipe = load_recipe(yaml.safe_load(PLAIN_YAML.format(**trio)))
    request = GraftRequest(recipe, str(tmp_path / "recipe"))
    assert request.plain and request.options.alpha == 0.5
    result = run_graft(request, settings=Settings())
    flags = output_bytes(tmp_path / "flags")
    assert len(flags) >= 4 and any(n.endswith(".safetensors") for n in flags)
    assert output_bytes(tmp_path / "recipe") == flags
    # The manifest records the request, the recipe; it reads as the plain transfer's formula.
    assert result.manifest["recipe"] == recipe.to_dict()
    assert result.manifest["formula"] == "target_base + alpha * (source_finetuned - source_base)"
    # The same recipe from a dict with defaults left out and the weight as an integer: still today's graft.
    as_dict = {"target_base": trio["target_base"],
               "diffs": [{"source_base": trio["source_base"], "source_finetuned": trio["source_finetuned"]}]}
    run_graft(GraftRequest(load_recipe(as_dict), str(tmp_path / "dict")), settings=Settings())
    graft(trio, tmp_path / "flags1")
    assert output_bytes(tmp_path / "dict") == output_bytes(tmp_path / "flags1")


def test_one_diff_recipe_with_a_transform_differs_and_matches(trio, tmp_path):
    recipe = {"target_base": trio["target_base"],
              "diffs": [{"source_base": trio["source_base"], "source_finetuned": trio["source_finetuned"],
                         "weight": 0.5, "transform": {"method": "magnitude", "density": 0.2}}]}
    result = run_recipe(recipe, tmp_path / "recipe")
    graft(trio, tmp_path / "flags", alpha=0.5)
    flags, made = output_bytes(tmp_path / "flags"), output_bytes(tmp_path / "recipe")
    assert set(flags) == set(made)
    assert made["config.json"] == flags["config.json"]
    assert [n for n in flags if flags[n] != made[n] and n.endswith(".safetensors")]
    want = expected(recipe)  # the trio's target has a tensor of its own (copied) and the fine-tune adds rows
    got = assert_output(str(tmp_path / "recipe"), want)
    assert want["model.rotary_emb.inv_freq"]["diffs"] is None
    assert got[EMBED].shape[0] == VOCAB + ADDED
    assert_manifest(result.manifest, recipe, want)


# --- 4. bad recipes, refused before any data is read ---------------------------------------------------

_GOOD = {"target_base": "/m/t", "diffs": [{"source_base": "/m/b", "source_finetuned": "/m/f"}]}


def _with(**changes) -> dict:
    return {**_GOOD, **changes}


def _diff(**changes) -> dict:
    return _with(diffs=[{**_GOOD["diffs"][0], **changes}])


BAD_RECIPES = {
    "unknown merge": (_with(merge={"method": "average_of_vibes"}), "merge"),
    "unknown transform": (_diff(transform={"method": "prune"}), "diffs.0.transform"),
    "density zero": (_with(merge={"method": "ties", "density": 0.0}), "density"),
    "density above one": (_diff(transform={"method": "magnitude", "density": 1.5}), "density"),
    "density negative (dare_ties)": (_with(merge={"method": "dare_ties", "density": -0.1}), "density"),
    "breadcrumbs density": (_diff(transform={"method": "breadcrumbs", "density": 0}), "density"),
    "dare drop one": (_diff(transform={"method": "dare", "drop": 1.0}), "drop"),
    "empty diffs": (_with(diffs=[]), "diffs"),
    "no diffs": ({"target_base": "/m/t"}, "diffs"),
    "weight of strings": (_diff(weight=["a", "b"]), "diffs.0.weight"),
    "weight a string": (_diff(weight="1.0"), "diffs.0.weight"),
    "weight empty list": (_diff(weight=[]), "diffs.0.weight"),
    "weight nan": (_diff(weight=float("nan")), "diffs.0.weight"),
    "rule bad regex": (_with(rules=[{"match": "(unclosed", "weight": 1.0}]), "rules.match"),
    "rule without effect": (_with(rules=[{"match": "mlp"}]), "rules"),
    "rule weight wrong type": (_with(rules=[{"match": "mlp", "weight": {"a": 1}}]), "rules.0.weight"),
    "unknown field": (_with(difs=[]), "difs"),
    "unknown method parameter": (_with(merge={"method": "ties", "densty": 0.5}), "densty"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_names_the_field(case):
    data, field = BAD_RECIPES[case]
    with pytest.raises(GraftError) as info:
        load_recipe(data)
    assert info.value.code == "invalid_recipe"
    assert field in info.value.message, info.value.message


def _refused_before_reading(recipe: dict, output) -> GraftError:
    phases: list[str] = []
    with pytest.raises(GraftError) as info:
        run_recipe(recipe, output, progress=lambda p: phases.append(p.phase))
    assert set(phases) == {"resolving"}, phases  # neither statistics nor streaming began
    assert not os.path.exists(output)
    return info.value


def test_diff_disagreeing_in_shape_is_refused(f32, tmp_path):
    recipe = recipe_of(f32, {"method": "ties", "density": 0.5}, ({}, {}))
    recipe["diffs"][1] = {"source_base": f32["base"], "source_finetuned": f32["ft_wide"]}
    err = _refused_before_reading(recipe, tmp_path / "out")
    assert err.code == "shape_conflict"
    assert "mlp.up_proj" in err.message


def test_diffs_with_different_vocabularies_are_refused(f32, tmp_path):
    recipe = recipe_of(f32, {"method": "sum"}, ({}, {}))
    recipe["diffs"][1]["source_finetuned"] = f32["ft_rows"]
    err = _refused_before_reading(recipe, tmp_path / "out")
    assert err.code == "vocab_mismatch"
    assert EMBED in err.message or HEAD in err.message
    # ...which the target policy resolves: only the target's rows, merged from both diffs.
    recipe["options"] = {"vocab": "target"}
    run_recipe(recipe, tmp_path / "target_rows")
    assert load_dir(str(tmp_path / "target_rows"))[EMBED].shape[0] == VOCAB


# --- 5. the statistics pass is a phase of its own -------------------------------------------------------

def test_statistics_phase_precedes_the_compute_pass(f32, tmp_path):
    reports: list[tuple[str, int, int]] = []
    recipe = recipe_of(f32, {"method": "ties", "density": 0.3}, ({}, {}))
    run_recipe(recipe, tmp_path / "ties", progress=lambda p: reports.append((p.phase, p.bytes_written,
                                                                               p.bytes_total)))
    phases = [p for p, _, _ in reports]
    distinct = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert distinct == ["resolving", "statistics", "streaming", "committing", "done"], distinct
    # The statistics pass reports its own progress, up to the whole of both passes.
    stat = [written / total for p, written, total in reports if p == "statistics"]
    assert stat == sorted(stat) and stat[-1] == pytest.approx(1.0)
    # No magnitude threshold to find (a plain sum, or DARE alone): no statistics pass.
    reports.clear()
    run_recipe(recipe_of(f32, {"method": "dare_ties", "density": 0.5}, ({}, {})), tmp_path / "dare",
               progress=lambda p: reports.append((p.phase, p.bytes_written, p.bytes_total)))
    assert reports
    assert "statistics" not in [p for p, _, _ in reports]


_PEAKS = """
import json, resource, sys
from worker.engine import GraftRequest, run_graft
from worker.engine.planning.recipe import load_recipe
from worker.service.settings import Settings

peaks = []
for i, recipe in enumerate(json.loads(sys.argv[1])):
    run_graft(GraftRequest(load_recipe(recipe), sys.argv[2] + str(i)), settings=Settings())
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(peaks))
"""


def test_statistics_memory_does_not_grow_with_the_number_of_tensors(tmp_path):
    """A deep, narrow model (722 tensors per diff to rank, each a few KB): the statistics pass must not hold a
    histogram per tensor for the whole pass (512 KB each: 700 MB here), only for the tensors being read."""
    import json
    import subprocess
    import sys

    shape = LlamaShape(layers=80, hidden=16, intermediate=32, heads=2, kv_heads=1)
    base = llama_state(shape, seed=1, dtype=torch.float32)
    models = {"base": base, "ft_a": perturb(base, seed=2), "ft_b": perturb(base, seed=3),
              "target": perturb(base, seed=4, scale=0.2)}
    paths = {n: save_checkpoint(str(tmp_path / n), st, shape.config()) for n, st in models.items()}
    plain = recipe_of(paths, {"method": "sum"}, ({}, {}))
    ties = recipe_of(paths, {"method": "ties", "density": 0.5}, ({}, {}))
    done = subprocess.run([sys.executable, "-c", _PEAKS, json.dumps([plain, ties]), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=True)
    plain_peak, ties_peak = json.loads(done.stdout.splitlines()[-1])
    assert ties_peak - plain_peak < 100 << 20, (plain_peak >> 20, ties_peak >> 20)


def test_a_diff_of_another_architecture_is_refused_before_any_data_is_read(tmp_path):
    """mismatched architectures: a diff whose configs name another model_type than the target's."""
    import json
    import shutil

    from worker.devtools.sample_models import make_trio
    from worker.engine.errors import GraftError
    from worker.engine.pipeline.graft import run_graft
    from worker.engine.planning.recipe import load_recipe
    from worker.engine.planning.request import GraftRequest
    from worker.service.settings import Settings

    paths = make_trio(str(tmp_path / "trio"), added_rows=0)
    other = tmp_path / "other-arch"
    shutil.copytree(paths["source_finetuned"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    base = paths["source_base"]
    recipe = load_recipe({"target_base": paths["target_base"], "merge": {"method": "ties", "density": 0.5},
                          "diffs": [{"source_base": base, "source_finetuned": paths["source_finetuned"]},
                                    {"source_base": base, "source_finetuned": str(other)}]})
    phases = []
    with pytest.raises(GraftError) as err:
        run_graft(GraftRequest(recipe, str(tmp_path / "out")), settings=Settings(cache_dir=""),
                  progress=lambda p: phases.append(p.phase))
    assert err.value.code == "architecture_mismatch" and "diffs.1.source_finetuned" in err.value.message
    assert phases == ["resolving"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["ties", "dare_ties", "magnitude", "ties_unnormalized_own_transform"])
def test_an_exact_diff_artifact_in_place_of_a_pair_writes_the_same_bytes(bf16, tmp_path, case):
    """Recipes take artifacts wherever they take a pair, through every method: the statistics passes and the
    transforms see the decoded delta, which is the pair's."""
    from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
    from worker.engine.pipeline.diff_extract import extract_diff

    merge, diffs, extra = CASES[case]
    recipe = recipe_of(bf16, merge, diffs, **extra)
    run_recipe(recipe, tmp_path / "pairs")
    first = recipe["diffs"][0]
    spec = DiffExtract(source_base=first["source_base"], source_finetuned=first["source_finetuned"])
    extract_diff(DiffExtractRequest(spec, str(tmp_path / "diff")), Settings())
    mixed = {**recipe, "diffs": [{k: v for k, v in first.items() if k not in ("source_base", "source_finetuned")}
                                 | {"diff": str(tmp_path / "diff")}, *recipe["diffs"][1:]]}
    result = run_recipe(mixed, tmp_path / "mixed")
    assert output_bytes(tmp_path / "mixed") == output_bytes(tmp_path / "pairs")
    assert result.manifest["diff_artifacts"][0]["uri"] == str(tmp_path / "diff")


def test_an_artifact_onto_a_target_that_does_not_fit_fails_as_the_pair_would(f32, tmp_path):
    from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
    from worker.engine.pipeline.diff_extract import extract_diff

    extract_diff(DiffExtractRequest(DiffExtract(source_base=f32["base"], source_finetuned=f32["ft_a"]),
                                    str(tmp_path / "diff")), Settings())
    for target in ("ft_wide",):  # another MLP width
        pair = recipe_of({**f32, "target": f32[target]}, None, ({},))
        artifact = {**pair, "diffs": [{"diff": str(tmp_path / "diff")}]}
        codes = []
        for recipe in (pair, artifact):
            with pytest.raises(GraftError) as err:
                run_recipe(recipe, tmp_path / f"out-{target}")
            codes.append((err.value.code, err.value.message))
        assert codes[0] == codes[1] and not os.path.exists(tmp_path / f"out-{target}")
