"""The methods that came through the statistics seam, each against a float64 reference written here from
mergekit 0.1.5's definitions (whole small tensors): della and della_linear (magnitude-ranked keep
probabilities within rows, graft's documented draw, the L1 rescale), sce (variance selection, squared-norm
weights, sign election), DARE without a rescale and with mergekit's L1 one, TIES' and magnitude's L1 rescale.
Each is also streamed at a small block size and with small chunks: the same bytes as in one block."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from graft_helpers import documented_draw, load_dir

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.compute import merge_kernel
from worker.engine.planning.recipe import load_recipe
from worker.service.settings import Settings

EPS32 = 2.0 ** -24


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """bf16 matrices and float32 norms: every delta is exact in float32 (a sum of two of them rounds to the
    sign of the exact sum), and many magnitudes are equal within a row."""
    root = str(tmp_path_factory.mktemp("della_sce"))
    shape = LlamaShape(layers=2)
    base = llama_state(shape, seed=200)
    states = {"base": base, "ft_a": perturb(base, seed=201), "ft_b": perturb(base, seed=202, scale=0.08),
              "target": perturb(base, seed=203, scale=0.2)}
    return {n: save_checkpoint(os.path.join(root, n), st, shape.config()) for n, st in states.items()}


# --- the reference --------------------------------------------------------------------------------------

def _hash(seed: int, index: int, name: str, n: int) -> np.ndarray:
    """graft's documented draw (graft_helpers.documented_draw) as float64."""
    return documented_draw(seed, index, name, n).astype(np.float64)


def _l1(delta: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """mergekit's rescaled_masked_tensor(norm=l1): the factor formed in float32 from the two norms."""
    before, after = np.float32(np.abs(delta).sum()), np.float32(np.abs(masked).sum())
    if before < np.float32(1e-7) or after < np.float32(1e-7):
        return masked
    return masked * float(before / after)


def _della(delta: np.ndarray, shape: tuple, spec: dict, index: int, name: str) -> np.ndarray:
    """della (mergekit's della_magprune): within each row (a vector is one row), ascending |delta| rank r
    (ties: lower index first) gives p = (density - eps) + r / (n - 1) * 2 * eps in float32; kept iff
    hash / 2**32 < p."""
    density, eps = spec["density"], spec.get("epsilon", 0.15)
    if density >= 1:
        return delta
    row = int(np.prod(shape[1:])) if len(shape) >= 2 else delta.size
    mags = np.abs(delta.astype(np.float32)).reshape(-1, row)
    ranks = np.empty(mags.shape, dtype=np.int64)
    order = np.argsort(mags, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(row)[None, :].repeat(mags.shape[0], 0), axis=1)
    rn = np.clip(ranks.astype(np.float32) / np.float32(row - 1), 0, 1)
    p = (rn * np.float32(2)) * np.float32(eps) + np.float32(density - eps)
    keep = _hash(spec.get("seed", 0), index, name, delta.size) < p.reshape(-1).astype(np.float64) * 2.0 ** 32
    masked = np.where(keep, delta, 0.0)
    return _l1(delta, masked) if spec.get("rescale", True) else masked


def _top(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """Elements whose descending rank by `values` (ties: lower index first) is in [low, high)."""
    keep = np.zeros(values.size, dtype=bool)
    keep[np.lexsort((np.arange(values.size), -values))[low:high]] = True
    return keep


def _transform(delta: np.ndarray, shape: tuple, spec: dict | None, index: int, name: str) -> np.ndarray:
    if spec is None:
        return delta
    method, n = spec["method"], delta.size
    if method == "della":
        return _della(delta, shape, spec, index, name)
    if method == "magnitude":
        k = min(n, max(1, int(spec["density"] * n)))
        masked = np.where(_top(np.abs(delta.astype(np.float32)).astype(np.float64), 0, k), delta, 0.0)
        return _l1(delta, masked) if spec.get("rescale") and k < n else masked
    if method == "dare":
        keep = _hash(spec.get("seed", 0), index, name, n) >= int(spec["drop"] * 2**32)
        masked = np.where(keep, delta, 0.0)
        rescale = spec.get("rescale", "inverse")
        return masked / (1 - spec["drop"]) if rescale == "inverse" else _l1(delta, masked) if rescale else masked
    raise AssertionError(method)


def _elect(t: np.ndarray, weighted: list[np.ndarray], weights: list[float], normalize: bool, lam: float):
    total = sum(weighted)
    majority = np.where(total >= 0, 1.0, -1.0)
    joins = [(x != 0) & (np.sign(x) == majority) for x in weighted]
    merged = sum(np.where(j, x, 0.0) for j, x in zip(joins, weighted, strict=True))
    if normalize:
        divisor = sum(w * j for w, j in zip(weights, joins, strict=True))
        merged = merged / np.where(divisor == 0, 1.0, divisor)
    return t + lam * merged


def _sce(t: np.ndarray, deltas: list[np.ndarray], topk: float, lam: float) -> np.ndarray:
    """mergekit's sce_merge: the selection by torch.var's float32 values (ties at the cut: lower index first),
    weights mean(d_i^2) / sum, sign election, sum(w_i d_i agree_i) / max(sum(w_i agree_i), 1e-6)."""
    if topk < 1:
        var = torch.var(torch.stack([torch.from_numpy(d).float() for d in deltas]), dim=0, unbiased=False)
        var = var.double().numpy()
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk))
        keep = _top(var, 0, k)
        deltas = [np.where(keep, d, 0.0) for d in deltas]
    means = np.array([np.mean(d * d) for d in deltas])
    weights = means / means.sum() if abs(means.sum()) >= 1e-6 else np.full(len(deltas), 1 / len(deltas))
    majority = np.where(sum(deltas) >= 0, 1.0, -1.0)
    agree = [(np.sign(d) == majority) for d in deltas]
    merged = sum(w * d * a for w, d, a in zip(weights, deltas, agree, strict=True))
    divisor = np.maximum(sum(w * a for w, a in zip(weights, agree, strict=True)), 1e-6)
    return t + lam * merged / divisor


def expected(recipe: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: (float64 reference, the magnitudes summed: the float32 accumulation's tolerance)."""
    target = load_dir(recipe["target_base"])
    pairs = [(load_dir(d["source_base"]), load_dir(d["source_finetuned"])) for d in recipe["diffs"]]
    merge = recipe["merge"]
    out = {}
    for name, t in target.items():
        t64 = t.double().reshape(-1).numpy()
        raw = [(f[name].double() - s[name].double()).reshape(-1).numpy() for s, f in pairs]
        if merge["method"] == "sce":
            values = _sce(t64, raw, merge.get("select_topk", 1.0), merge.get("lambda", 1.0))
            bound = np.abs(t64) + sum(np.abs(d) for d in raw)
            out[name] = (values.reshape(t.shape), bound.reshape(t.shape))
            continue
        default = _default(merge)
        weights = [float(d.get("weight", 1.0)) for d in recipe["diffs"]]
        deltas = [_transform(d, tuple(t.shape), diff.get("transform") or default, i, name)
                  for i, (d, diff) in enumerate(zip(raw, recipe["diffs"], strict=True))]
        weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
        lam = merge.get("lambda", 1.0)
        if merge["method"] in ("della", "ties"):
            values = _elect(t64, weighted, weights, merge.get("normalize", True), lam)
        else:
            total = sum(weighted)
            if merge.get("normalize", False) and abs(sum(weights)) >= 1e-8:
                total = total / sum(weights)
            values = t64 + lam * total
        bound = np.abs(t64) + abs(lam) * sum(np.abs(x) for x in weighted) * (2 if merge.get("normalize") else 1)
        out[name] = (values.reshape(t.shape), bound.reshape(t.shape))
    return out


def _default(merge: dict) -> dict | None:
    density = merge.get("density", 1.0)
    if merge["method"] in ("della", "della_linear") and density < 1:
        return {"method": "della", "density": density, "epsilon": merge.get("epsilon", 0.15),
                "rescale": merge.get("rescale", True), "seed": merge.get("seed", 0)}
    if merge["method"] == "ties" and density < 1:
        return {"method": "magnitude", "density": density, "rescale": merge.get("rescale", False)}
    return None


def assert_matches(output: str, want: dict) -> None:
    """bf16 outputs: the rounding of a value within float32 accumulation's error of the reference (a kept or
    dropped element moves an output by its whole delta, far beyond that); float32 norms: within that error."""
    got = load_dir(output)
    assert set(got) == set(want)
    for name, (ref, bound) in want.items():
        out, ref, bound = got[name], torch.from_numpy(ref), torch.from_numpy(bound)
        tol = 16 * EPS32 * bound
        if out.dtype == torch.float32:
            ok = (out.double() - ref).abs() <= tol
        else:
            low, high = (ref - tol).to(out.dtype), (ref + tol).to(out.dtype)
            ok = (out >= torch.minimum(low, high)) & (out <= torch.maximum(low, high))
        assert bool(ok.all()), (name, torch.nonzero(~ok)[:5].tolist())


def recipe_of(models: dict[str, str], merge: dict, diffs: tuple = ({}, {})) -> dict:
    return {"target_base": models["target"], "merge": merge,
            "diffs": [{"source_base": models["base"], "source_finetuned": models[("ft_a", "ft_b")[i]], **d}
                      for i, d in enumerate(diffs)]}


def run(recipe: dict, output, **settings):
    return run_graft(GraftRequest(load_recipe(recipe), str(output)), settings=Settings(**settings))


def shards(directory) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as fh:
                out[name] = fh.read()
    return out


CASES = {
    "della": ({"method": "della", "density": 0.5, "epsilon": 0.2, "seed": 7}, ({"weight": 1.0}, {"weight": 0.6})),
    "della_no_rescale": ({"method": "della", "density": 0.4, "rescale": False, "lambda": 1.5}, ({}, {})),
    "della_linear": ({"method": "della_linear", "density": 0.6, "epsilon": 0.1}, ({"weight": 0.7}, {"weight": 0.3})),
    "della_linear_normalized": ({"method": "della_linear", "density": 0.3, "normalize": True},
                                ({"weight": 0.5}, {"weight": 1.5})),
    "della_own": ({"method": "sum"}, ({"transform": {"method": "della", "density": 0.7,
                                                             "epsilon": 0.05, "seed": 3}},)),
    "sce": ({"method": "sce", "select_topk": 0.3}, ({}, {})),
    "sce_all": ({"method": "sce"}, ({}, {})),
    "sce_lambda": ({"method": "sce", "select_topk": 0.7, "lambda": 0.5}, ({}, {})),
    "dare_no_rescale": ({"method": "sum"}, ({"transform": {"method": "dare", "drop": 0.6, "rescale": False}},
                                            {"weight": 0.5})),
    "dare_l1": ({"method": "sum"}, ({"transform": {"method": "dare", "drop": 0.6, "seed": 2, "rescale": True}},)),
    "ties_rescale": ({"method": "ties", "density": 0.3, "rescale": True}, ({}, {"weight": 0.5})),
    "magnitude_rescale": ({"method": "sum"}, ({"transform": {"method": "magnitude", "density": 0.25,
                                                             "rescale": True}},)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_float64_reference(models, tmp_path, case):
    merge, diffs = CASES[case]
    recipe = recipe_of(models, merge, diffs)
    run(recipe, tmp_path / "out")
    assert_matches(str(tmp_path / "out"), expected(recipe))


@pytest.mark.parametrize("case", ["della", "della_linear", "sce", "ties_rescale", "dare_l1"])
def test_the_same_bytes_whatever_the_block_size(models, tmp_path, monkeypatch, case):
    """In one block (the models are far smaller than a block), over 2 KB blocks with the compute and the
    statistics in 1000-element chunks (della's: whole rows, 960 of a 64-wide matrix), and piece at once as an
    accelerator takes it."""
    from worker.engine.compute import stream
    from worker.engine.compute.arithmetic import Arithmetic

    recipe = recipe_of(models, *CASES[case])
    run(recipe, tmp_path / "one")
    with monkeypatch.context() as patch:
        patch.setattr(merge_kernel, "CHUNK", 1000)
        run(recipe, tmp_path / "small", block_bytes=2048, prefetch_blocks=1)
    with monkeypatch.context() as patch:
        patch.setattr(stream, "Arithmetic", lambda device: Arithmetic(device, whole_pieces=True))
        run(recipe, tmp_path / "whole", block_bytes=2048)
    assert shards(tmp_path / "small") == shards(tmp_path / "one")
    assert shards(tmp_path / "whole") == shards(tmp_path / "one")


def test_della_keeps_about_density_and_more_of_the_large(models, tmp_path):
    """The keep probability rises with the magnitude rank: density on average, density + epsilon at the top
    of a row, density - epsilon at its bottom."""
    density, eps = 0.5, 0.3
    recipe = recipe_of(models, {"method": "della_linear", "density": density, "epsilon": eps, "rescale": False},
                       ({},))
    result = run(recipe, tmp_path / "out")
    name = "model.layers.0.mlp.down_proj.weight"
    fraction = result.manifest["tensors"][name]["merge"]["diffs"][0]["kept_fraction"]
    n = int(np.prod(result.manifest["tensors"][name]["shape"]))
    assert abs(fraction - density) <= 5 * (density * (1 - density) / n) ** 0.5
    out, t = load_dir(str(tmp_path / "out"))[name].double(), load_dir(models["target"])[name].double()
    delta = load_dir(models["ft_a"])[name].double() - load_dir(models["base"])[name].double()
    kept = (out - t).abs() > (delta.abs() / 2)
    order = delta.abs().argsort(dim=1, stable=True)
    top, bottom = kept.gather(1, order[:, -8:]).double().mean(), kept.gather(1, order[:, :8]).double().mean()
    assert top > density + eps / 2 and bottom < density - eps / 2


def test_statistics_phase_counts_the_reads_sce_needs(models, tmp_path):
    """The variance's two reads, then the squares': three passes, said in the plan and in progress."""
    from worker.engine.pipeline.resolve import close_models, plan_graft

    recipe = recipe_of(models, {"method": "sce", "select_topk": 0.5}, ({}, {}))
    request = GraftRequest(load_recipe(recipe), str(tmp_path / "out"))
    plan, resolved = plan_graft(request)
    close_models(resolved)
    assert plan.to_dict()["recipe"]["statistics_passes"] == 3
    phases = []
    run_graft(request, settings=Settings(block_bytes=4096),
              progress=lambda p: phases.append((p.phase, p.bytes_written / p.bytes_total if p.bytes_total else 0)))
    stat = [f for p, f in phases if p == "statistics"]
    assert stat == sorted(stat) and stat[-1] == pytest.approx(1.0)
    assert any(0.3 < f < 0.4 for f in stat) and any(0.6 < f < 0.7 for f in stat)  # three passes, one by one
    distinct = [p for i, (p, _f) in enumerate(phases) if i == 0 or phases[i - 1][0] != p]
    assert distinct == ["resolving", "statistics", "streaming", "committing", "done"]


BAD = {
    "epsilon too wide": ({"method": "della", "density": 0.2, "epsilon": 0.2}, ({}, {}), "epsilon"),
    "epsilon past one": ({"method": "sum"}, ({"transform": {"method": "della", "density": 0.9,
                                                            "epsilon": 0.1}},), "epsilon"),
    "select_topk above one": ({"method": "sce", "select_topk": 1.5}, ({}, {}), "select_topk"),
    "dare rescale": ({"method": "sum"}, ({"transform": {"method": "dare", "drop": 0.5, "rescale": "l2"}},),
                     "rescale"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_parameters_name_the_field(models, case):
    merge, diffs, field = BAD[case]
    with pytest.raises(GraftError) as info:
        load_recipe(recipe_of(models, merge, diffs))
    assert info.value.code == "invalid_recipe" and field in info.value.message, info.value.message


@pytest.mark.parametrize("diffs,field", [(({"weight": 0.5}, {}), "diffs.0.weight"),
                                         (({}, {"transform": {"method": "dare", "drop": 0.5}}), "diffs.1.transform")])
def test_sce_refuses_weights_and_transforms_before_reading(models, tmp_path, diffs, field):
    phases = []
    with pytest.raises(GraftError) as info:
        run_graft(GraftRequest(load_recipe(recipe_of(models, {"method": "sce"}, diffs)),
                                           str(tmp_path / "out")),
                  settings=Settings(), progress=lambda p: phases.append(p.phase))
    assert info.value.code == "invalid_recipe" and field in info.value.message
    assert set(phases) == {"resolving"} and not (tmp_path / "out").exists()


# --- what a mergekit config maps to, by mergekit's parameter names --------------------------------------------

def _imported(method: str, params: list[dict], top: dict | None = None) -> dict:
    from worker.engine.planning.mergekit_config import recipe_from_mergekit

    cfg = {"merge_method": method, "base_model": "/m/base",
           "models": [{"model": f"/m/ft{i}", "parameters": p} for i, p in enumerate(params)]}
    if top:
        cfg["parameters"] = top
    return recipe_from_mergekit(cfg, resolve_local=False).to_dict()


def test_mergekit_configs_reach_the_new_methods_by_name():
    r = _imported("della", [{"weight": 1, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": [0.3, 0.6]}])
    assert r["merge"]["method"] == "ties" and r["merge"]["normalize"] is True  # mergekit's della: the vote
    assert [d["transform"] for d in r["diffs"]] == [
        {"method": "della", "density": 0.5, "epsilon": 0.1, "rescale": True, "seed": 0},
        {"method": "della", "density": [0.3, 0.6], "epsilon": 0.15, "rescale": True, "seed": 0}]
    r = _imported("della_linear", [{"weight": 1, "density": 0.5}], {"rescale": False})
    assert r["merge"]["method"] == "sum" and r["diffs"][0]["transform"]["rescale"] is False
    r = _imported("sce", [{}, {}], {"select_topk": 0.4, "int8_mask": True})
    assert {k: r["merge"][k] for k in ("method", "select_topk", "lambda")} == {"method": "sce", "select_topk": 0.4,
                                                                              "lambda": 1.0}
    r = _imported("dare_linear", [{"weight": 1, "density": 0.5}], {"rescale": False})
    assert r["diffs"][0]["transform"]["rescale"] is False
    r = _imported("ties", [{"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}], {"rescale": True})
    assert r["merge"]["density"] == 0.5 and r["merge"]["rescale"] is True
