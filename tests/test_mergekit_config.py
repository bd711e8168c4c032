"""mergekit configs of the task-vector family read as recipes: each method's mapping (mergekit 0.1.5's
defaults for normalize and rescale), weight lists, top-level fallbacks, dtypes, model references, refusals
naming the key, and mapped TIES and breadcrumbs configs run end to end on tiny models against float64
references of mergekit's code written here (breadcrumbs: its magnitude_outliers window at every rounding
edge). Hostile YAML (the loader's bounds and refusals) is in test_mergekit_hostile.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from graft_helpers import correctly_rounded, load_dir, ulp_error

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.planning.mergekit_config import recipe_from_mergekit
from worker.service.settings import Settings

BASE, FT1, FT2 = "/models/base", "/models/ft1", "/models/ft2"


def _config(method: str, p1: dict | None = None, p2: dict | None = None, **top) -> dict:
    cfg = {"merge_method": method, "base_model": BASE,
           "models": [{"model": BASE}, {"model": FT1, "parameters": p1 or {"weight": 1.0}},
                      {"model": FT2, "parameters": p2 or {"weight": 1.0}}]}
    cfg.update(top)
    return cfg


def _mapped(cfg: dict | str) -> dict:
    return recipe_from_mergekit(cfg).to_dict()


def _refused(cfg: dict | str) -> str:
    with pytest.raises(GraftError) as err:
        recipe_from_mergekit(cfg)
    assert err.value.code == "invalid_recipe"
    return err.value.message


# --- each method ----------------------------------------------------------------------------------------

def test_task_arithmetic_is_a_sum_over_the_base():
    r = _mapped(_config("task_arithmetic", {"weight": 0.7}, {"weight": -0.3}, parameters={"lambda": 2.0}))
    assert r["target_base"] == BASE
    assert [(d["source_base"], d["source_finetuned"], d["weight"], d["transform"]) for d in r["diffs"]] == [
        (BASE, FT1, 0.7, None), (BASE, FT2, -0.3, None)]
    assert r["merge"] == {"method": "sum", "normalize": False, "lambda": 2.0}
    assert r["options"]["vocab"] == "target" and r["options"]["dtype"] == "auto"


def test_ties_shared_density_goes_to_the_merge_with_normalize_on():
    r = _mapped(_config("ties", {"weight": 1, "density": 0.2}, {"weight": 0.5, "density": 0.2}))
    assert r["merge"] == {"method": "ties", "density": 0.2, "normalize": True, "lambda": 1.0}
    assert [d["transform"] for d in r["diffs"]] == [None, None]


def test_ties_per_model_densities_become_magnitude_transforms():
    r = _mapped(_config("ties", {"weight": 1, "density": 0.2}, {"weight": 1, "density": 0.5},
                        parameters={"normalize": False}))
    assert r["merge"] == {"method": "ties", "density": 1.0, "normalize": False, "lambda": 1.0}
    assert [d["transform"] for d in r["diffs"]] == [{"method": "magnitude", "density": 0.2},
                                                    {"method": "magnitude", "density": 0.5}]


def test_dare_ties_keeps_mergekits_default_normalize_off():
    r = _mapped(_config("dare_ties", {"weight": 1, "density": 0.3}, {"weight": 1, "density": 0.3}))
    # mergekit's rescale (on by default for the dare methods) is its L1 rescale: dare's `rescale: true`.
    assert r["merge"] == {"method": "dare_ties", "density": 0.3, "seed": 0, "normalize": False, "lambda": 1.0,
                          "rescale": True}
    r = _mapped(_config("dare_ties", {"weight": 1, "density": 0.3}, {"weight": 1}))
    assert r["merge"]["density"] == 1.0
    assert [d["transform"] for d in r["diffs"]] == [{"method": "dare", "drop": pytest.approx(0.7), "seed": 0,
                                                     "rescale": True}, None]


def test_dare_linear_is_a_sum_of_dared_diffs():
    r = _mapped(_config("dare_linear", {"weight": 1, "density": 0.25}, {"weight": 2, "density": 0.5}))
    assert r["merge"] == {"method": "sum", "normalize": False, "lambda": 1.0}
    assert [d["transform"]["drop"] for d in r["diffs"]] == [0.75, 0.5]


def test_breadcrumbs_and_breadcrumbs_ties():
    r = _mapped(_config("breadcrumbs", {"weight": 1, "density": 0.5, "gamma": 0.05}, {"weight": 1, "density": 0.5}))
    assert r["merge"]["method"] == "sum" and r["merge"]["normalize"] is False
    assert [d["transform"] for d in r["diffs"]] == [
        {"method": "breadcrumbs", "density": 0.5, "gamma": 0.05, "semantics": "mergekit"},
        {"method": "breadcrumbs", "density": 0.5, "gamma": 0.01, "semantics": "mergekit"}]
    r = _mapped(_config("breadcrumbs_ties", {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}))
    assert r["merge"] == {"method": "ties", "density": 1.0, "normalize": False, "lambda": 1.0}
    assert all(d["transform"]["method"] == "breadcrumbs" for d in r["diffs"])


def test_breadcrumbs_gamma_reaches_the_transform_as_given():
    """Capping gamma at 1 - density here rounded differently from mergekit (which shrinks the outliers per
    tensor, after rounding): the transform takes gamma as it is and mergekit's window rule."""
    r = _mapped(_config("breadcrumbs", {"weight": 1, "density": 0.9, "gamma": 0.3}, {"weight": 1, "density": 1}))
    assert r["diffs"][0]["transform"] == {"method": "breadcrumbs", "density": 0.9, "gamma": 0.3,
                                          "semantics": "mergekit"}
    assert r["diffs"][1]["transform"] is None  # mergekit returns the delta untouched at density 1


def test_linear_with_a_base_is_a_normalized_transfer():
    cfg = {"merge_method": "linear", "base_model": BASE,
           "models": [{"model": BASE, "parameters": {"weight": 2.0}}, {"model": FT1, "parameters": {"weight": 1.0}},
                      {"model": FT2, "parameters": {"weight": 1.0}}]}
    r = _mapped(cfg)
    assert [d["weight"] for d in r["diffs"]] == [0.25, 0.25]
    assert r["merge"] == {"method": "sum", "normalize": False, "lambda": 1.0}
    cfg["parameters"] = {"normalize": False}
    cfg["models"][0]["parameters"]["weight"] = -1.0
    assert [d["weight"] for d in _mapped(cfg)["diffs"]] == [1.0, 1.0]  # -1 + 1 + 1 = 1: base + d1 + d2


def test_top_level_parameters_apply_to_models_without_their_own():
    cfg = {"merge_method": "ties", "base_model": BASE, "parameters": {"weight": 0.5, "density": 0.4},
           "models": [{"model": FT1}, {"model": FT2, "parameters": {"weight": 1.0}}]}
    r = _mapped(cfg)
    assert [d["weight"] for d in r["diffs"]] == [0.5, 1.0]
    assert r["merge"]["density"] == 0.4


def test_weight_and_density_lists_stay_lists_interpolated_as_mergekit_does():
    """A constant list is kept: mergekit's interpolation of equal points can differ from them in the last bit."""
    r = _mapped(_config("ties", {"weight": [0.0, 0.5, 1.0], "density": [0.3, 0.3]}, {"weight": 1, "density": 0.3}))
    assert r["diffs"][0]["weight"] == [0.0, 0.5, 1.0]
    assert r["diffs"][0]["transform"] == {"method": "magnitude", "density": [0.3, 0.3]}
    assert r["diffs"][1]["transform"] == {"method": "magnitude", "density": 0.3}
    r = _mapped(_config("ties", {"weight": 1, "density": [0.2, 0.4]}))
    assert r["diffs"][0]["transform"] == {"method": "magnitude", "density": [0.2, 0.4]}
    one = _config("ties", {"weight": [0.5], "density": [0.2]}, {"weight": 1, "density": 0.2})
    assert _mapped(one)["merge"]["density"] == 0.2  # one point is a number


def test_unconditional_filters_unwrap_and_numeric_strings_are_numbers():
    r = _mapped(_config("ties", {"weight": [{"filter": "*", "value": 0.5}, {"filter": "mlp", "value": 1}],
                                 "density": "2e-1"}))
    assert r["diffs"][0]["weight"] == 0.5


def test_yaml_text_and_dtypes():
    text = yaml.safe_dump(_config("task_arithmetic", dtype="float32", out_dtype="bfloat16"))
    assert _mapped(text)["options"]["dtype"] == "bfloat16"
    assert _mapped(_config("task_arithmetic", dtype="torch.float16"))["options"]["dtype"] == "float16"
    assert _mapped(_config("task_arithmetic", dtype="float64", out_dtype="float32"))["options"]["dtype"] == "float32"


def test_model_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("local-ft")
    cfg = {"merge_method": "task_arithmetic", "base_model": "org/base@v2",
           "models": [{"model": "local-ft", "parameters": {"weight": 1}},
                      {"model": "s3://bucket/ft", "parameters": {"weight": 1}}]}
    r = _mapped(cfg)
    assert r["target_base"] == "hf://org/base@v2"
    assert [d["source_finetuned"] for d in r["diffs"]] == [str(tmp_path / "local-ft"), "s3://bucket/ft"]
    # Without probing the filesystem (the API), a bare name is a hub repository.
    r = recipe_from_mergekit(cfg, resolve_local=False).to_dict()
    assert r["diffs"][0]["source_finetuned"] == "hf://local-ft"


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    ({"merge_method": "slerp"}, "merge_method"),
    ({"merge_method": "model_stock"}, "merge_method"),
    ({"merge_method": None}, "merge_method"),
    ({"base_model": None}, "base_model"),
    ({"slices": [{"sources": []}]}, "slices"),
    ({"modules": {}}, "modules"),
    ({"tokenizer_source": "org/not-merged"}, "tokenizer_source"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "base"}}}}, "tokenizer.tokens"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"merge_options": {}}, "merge_options"),
    ({"parameters": {"rescale": "yes"}}, "parameters.rescale"),
    ({"parameters": {"normalize": "yes"}}, "parameters.normalize"),
    ({"parameters": {"lambda": [1, 2]}}, "parameters.lambda"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon"),
    ({"dtype": "float64"}, "dtype"),
    ({"out_dtype": "int8"}, "out_dtype"),
    ({"models": []}, "models"),
    ({"models": [{"model": BASE}]}, "models"),
])
def test_refused_top_level(change, key):
    cfg = _config("ties", {"weight": 1, "density": 0.5})
    cfg.update(change)
    assert f": {key}:" in _refused(cfg)


@pytest.mark.parametrize("method, p1, key", [
    ("ties", {"weight": 1, "gamma": 0.1}, "models[1].parameters.gamma"),
    ("ties", {"weight": 1, "density": 0}, "models[1].parameters.density"),
    ("ties", {"density": 0.5}, "models[1].parameters.weight"),
    ("ties", {"weight": True}, "models[1].parameters.weight"),
    ("ties", {"weight": float("nan")}, "models[1].parameters.weight"),
    ("ties", {"weight": [{"filter": "mlp", "value": 1}]}, "models[1].parameters.weight"),  # no fallback
    ("ties", {"weight": 1, "normalize": True}, "models[1].parameters.normalize"),
    ("breadcrumbs", {"weight": 1, "density": 0.5, "gamma": 1.5}, "models[1].parameters.gamma"),
    ("linear", {"weight": 1, "density": 0.5}, "models[1].parameters.density"),
])
def test_refused_model_parameters(method, p1, key):
    assert f": {key}:" in _refused(_config(method, p1))


def test_refused_models_and_semantics():
    cfg = _config("ties")
    cfg["models"][1]["model"] = "org/model+org/lora"
    assert "models[1].model" in _refused(cfg) and "LoRA" in _refused(cfg)
    cfg = _config("ties")
    cfg["models"][2]["model"] = FT1
    assert "listed twice" in _refused(cfg)
    cfg = _config("ties")
    cfg["models"][1]["extra"] = 1
    assert "models[1].extra" in _refused(cfg)
    linear = {"merge_method": "linear", "base_model": BASE, "models": [{"model": FT1, "parameters": {"weight": 1}}]}
    assert "weighs the base model" in _refused(linear)
    linear["models"].append({"model": BASE, "parameters": {"weight": [1, 2]}})
    assert ": models[1].parameters.weight:" in _refused(linear)  # the base's weight, named where it is
    linear["models"][1]["parameters"]["weight"] = 1
    linear["parameters"] = {"normalize": False}
    assert "parameters.normalize" in _refused(linear)
    assert "not valid YAML" in _refused("merge_method: [ties")
    assert "mapping at the top level" in _refused("- ties")


# --- end to end -------------------------------------------------------------------------------------------

def _ties_reference(base: torch.Tensor, fts: list[torch.Tensor], density: float) -> torch.Tensor:
    """mergekit's ties (sum consensus, normalize) in float64: top-k by |delta| with ties at the threshold
    taken in element order, a sign vote by summed deltas (0 counts as +), the disjoint mean."""
    b = base.double().flatten()
    trimmed = []
    for ft in fts:
        d = ft.double().flatten() - b
        k = max(1, int(density * d.numel()))
        order = torch.sort(-d.abs(), stable=True).indices[:k]
        kept = torch.zeros_like(d)
        kept[order] = d[order]
        trimmed.append(kept)
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    joins = (stack != 0) & (torch.sign(stack) == sign)
    mixed = (stack * joins).sum(0)
    count = joins.sum(0).double()
    mixed = torch.where(count > 0, mixed / count.clamp(min=1), mixed)
    return (b + mixed).reshape(base.shape)


def test_a_mapped_ties_config_runs_end_to_end(tmp_path):
    shape = LlamaShape(layers=2)
    base = llama_state(shape, seed=40)
    paths = {}
    for name, state in (("base", base), ("ft1", perturb(base, seed=41)), ("ft2", perturb(base, seed=42))):
        paths[name] = save_checkpoint(str(tmp_path / name), state, shape.config())
    cfg = f"""
merge_method: ties
base_model: {paths['base']}
models:
  - model: {paths['base']}
  - model: {paths['ft1']}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {paths['ft2']}
    parameters: {{weight: 1.0, density: 0.2}}
dtype: float32
out_dtype: bfloat16
"""
    out = str(tmp_path / "out")
    result = run_graft(GraftRequest(recipe_from_mergekit(cfg), out), settings=Settings())
    assert result.manifest["recipe"]["merge"]["method"] == "ties"
    got = load_dir(out)
    states = {n: load_dir(p) for n, p in paths.items()}
    assert set(got) == set(base)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16  # out_dtype, norms included
        ref = _ties_reference(states["base"][name], [states["ft1"][name], states["ft2"][name]], 0.2)
        # float32 accumulation rounded once to bf16 against the float64 formula
        assert ulp_error(t, ref).max() <= 1.0, name
        exact = torch.equal(t, correctly_rounded(ref, torch.bfloat16))
        assert exact or (t != correctly_rounded(ref, torch.bfloat16)).float().mean() < 1e-3, name


def test_the_cli_refuses_naming_the_key(tmp_path):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config("ties", {"weight": 1, "density": 0.5}, tokenizer_source="org/other")))
    graft = os.path.join(os.path.dirname(sys.executable), "graft")
    proc = subprocess.run([graft, "run", "--mergekit-config", str(cfg), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[invalid_recipe]" in proc.stderr and "tokenizer_source" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- breadcrumbs: mergekit's magnitude_outliers window, every rounding edge ------------------------------

def _mergekit_outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit 0.1.5's sparsify.magnitude_outliers, line for line, in float64 (its ascending sort is stable
    here; the tests' magnitudes are distinct, so no tie order matters)."""
    if density >= 1:
        return delta
    num_elems = delta.size
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    n_bot = max(0, num_elems - target_n - n_top)  # fewer outliers dropped when needed to keep the density
    indices = np.argsort(np.abs(delta), kind="stable")
    mask = np.zeros(num_elems)
    mask[indices[n_bot:n_bot + target_n]] = 1
    return delta * mask


EDGE_SIZES = [*range(0, 72), 99, 100, 101, 127, 128, 199, 200, 201, 333, 1000, 1001, 4099]
EDGE_DENSITIES = [1e-9, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99,
                  0.999, 1 - 2**-53, 1.0]
EDGE_GAMMAS = [0.0, 1e-9, 0.001, 0.01, 0.02, 0.05, 0.1, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99, 1 - 2**-53]


def _distinct(n: int, seed: int) -> np.ndarray:
    """n deltas of distinct magnitudes (a shuffled 1..n on a 2**-20 grid), random signs."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(n) + 1.0) * 2.0**-20 * rng.choice([-1.0, 1.0], n)


def test_breadcrumbs_window_is_mergekits_over_sizes_densities_and_gammas():
    """Every (n, density, gamma) of the grid: gamma = 0, gamma * n < 1, density * n < 1, gamma + density = 1
    (0.3 + 0.7 and 0.6 + 0.4 are exactly 1 in floats) and past it, density just below 1 and at 1."""
    from worker.engine.methods import TRANSFORMS
    from worker.engine.planning.recipe import load_recipe

    crumbs = TRANSFORMS["breadcrumbs"]
    for n in EDGE_SIZES:
        delta = _distinct(n, n)
        rank = np.empty(n, dtype=np.int64)  # descending |delta| rank of each element
        rank[np.argsort(-np.abs(delta))] = np.arange(n)
        for density in EDGE_DENSITIES:
            for gamma in EDGE_GAMMAS:
                recipe = load_recipe({"target_base": BASE, "diffs": [{
                    "source_base": BASE, "source_finetuned": FT1,
                    "transform": {"method": "breadcrumbs", "density": density, "gamma": gamma,
                                  "semantics": "mergekit"}}]})
                window = crumbs.window(recipe.diffs[0].transform, n)
                got = np.ones(n, bool) if window is None else (rank >= window.low) & (rank < window.high)
                want = _mergekit_outliers(delta, density, gamma) != 0
                assert np.array_equal(got, want), (n, density, gamma, window)


def test_graft_breadcrumbs_keep_their_documented_window():
    """graft's own recipes: always int(gamma * n) outliers dropped, then at most int(density * n) kept, even
    where mergekit drops fewer outliers (gamma + density > 1)."""
    from worker.engine.methods import TRANSFORMS
    from worker.engine.methods.breadcrumbs import BreadcrumbsParams

    for n, density, gamma, want in [(64, 0.7, 0.4, (25, 64)), (64, 0.5, 0.0, (0, 32)), (50, 0.5, 0.01, (0, 25)),
                                    (100, 0.3, 0.7, (70, 100)), (10, 0.05, 0.2, (2, 2)), (0, 0.5, 0.5, (0, 0))]:
        window = TRANSFORMS["breadcrumbs"].window(BreadcrumbsParams(method="breadcrumbs", density=density,
                                                                    gamma=gamma), n)
        assert (window.low, window.high) == want, (n, density, gamma)


# (density, gamma) of each fine-tune: the issue's case, gamma 0, gamma + density = 1,
# density * n < 1, gamma * n < 1 on the small tensors, heavy overlap, default gamma, density 1 (untouched).
E2E_PARAMS = [(0.7, 0.4), (0.5, 0.0), (0.3, 0.7), (0.6, 0.4), (0.005, 0.05), (0.9, 0.01), (0.25, 0.25),
              (0.999, 0.5), (0.2, None), (1.0, 0.3)]
EXTRA_SIZES = (1, 2, 3, 5, 7, 10, 33, 64, 99, 100, 101, 199, 200, 333, 1000, 4099)


@pytest.fixture(scope="module")
def grid_models(tmp_path_factory) -> dict[str, str]:
    """float32 models whose every sum the engine forms is exact: bases on a 2**-6 grid (|b| <= 1), deltas of
    distinct magnitudes on a 2**-20 grid below 2**-7 (21 significant bits in any partial sum), tensors of
    many sizes besides Llama's own."""
    root = tmp_path_factory.mktemp("breadcrumbs")
    shape = LlamaShape(vocab=32, hidden=16, layers=1, intermediate=32, heads=2, kv_heads=1)
    rng = np.random.default_rng(5)
    names = {n: t.shape for n, t in llama_state(shape, seed=0, dtype=torch.float32).items()}
    names.update({f"model.extra.n{n}.weight": (n,) for n in EXTRA_SIZES})
    base = {n: torch.from_numpy(rng.integers(-64, 65, tuple(s)) * 2.0**-6).float() for n, s in names.items()}
    paths = {"base": save_checkpoint(str(root / "base"), base, shape.config())}
    for i in range(len(E2E_PARAMS)):
        ft = {n: t + torch.from_numpy(_distinct(t.numel(), 1000 * i + k).reshape(t.shape)).float()
              for k, (n, t) in enumerate(base.items())}
        paths[f"ft{i}"] = save_checkpoint(str(root / f"ft{i}"), ft, shape.config())
    return paths


def _crumbs_config(method: str, paths: dict[str, str], params: list[tuple], weights: list[float]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for i, ((density, gamma), weight) in enumerate(zip(params, weights, strict=True)):
        lines += [f"  - model: {paths[f'ft{i}']}", f"    parameters: {{weight: {weight}, density: {density}"
                  + ("}" if gamma is None else f", gamma: {gamma}}}")]
    return "\n".join([*lines, "dtype: float32", ""])


def _run_config(text: str, out: str) -> dict[str, torch.Tensor]:
    run_graft(GraftRequest(recipe_from_mergekit(text), out), settings=Settings())
    return load_dir(out)


def test_mapped_breadcrumbs_computes_what_mergekit_computes(grid_models, tmp_path):
    """Ten fine-tunes at once, one per rounding edge, summed (breadcrumbs: no consensus, normalize off):
    every output tensor equals base + sum_i w_i * magnitude_outliers(delta_i) bit for bit."""
    weights = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    got = _run_config(_crumbs_config("breadcrumbs", grid_models, E2E_PARAMS, weights), str(tmp_path / "out"))
    states = {name: load_dir(path) for name, path in grid_models.items()}
    assert set(got) == set(states["base"])
    for name, out in got.items():
        b = states["base"][name].double().numpy().ravel()
        want = b.copy()
        for i, ((density, gamma), w) in enumerate(zip(E2E_PARAMS, weights, strict=True)):
            delta = states[f"ft{i}"][name].double().numpy().ravel() - b
            want += w * _mergekit_outliers(delta, density, 0.01 if gamma is None else gamma)
        assert np.array_equal(out.double().numpy().ravel(), want), name


def test_mapped_breadcrumbs_ties_computes_what_mergekit_computes(grid_models, tmp_path):
    """breadcrumbs_ties: the trimmed deltas vote (mergekit's sum consensus, 0 counts as +, a zero never
    joins) and, normalize being off by default, the agreeing ones are summed."""
    params, weights = [(0.7, 0.4), (0.3, 0.7), (0.5, 0.0)], [1.0, 1.0, 1.0]
    got = _run_config(_crumbs_config("breadcrumbs_ties", grid_models, params, weights), str(tmp_path / "out"))
    base = load_dir(grid_models["base"])
    fts = [load_dir(grid_models[f"ft{i}"]) for i in range(len(params))]
    for name, out in got.items():
        b = base[name].double().numpy().ravel()
        trimmed = np.stack([w * _mergekit_outliers(ft[name].double().numpy().ravel() - b, d, g)
                            for ft, (d, g), w in zip(fts, params, weights, strict=True)])
        majority = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        want = b + (trimmed * (np.sign(trimmed) == majority)).sum(0)
        assert np.array_equal(out.double().numpy().ravel(), want), name


def test_the_issues_breadcrumbs_window(grid_models, tmp_path):
    """density 0.7, gamma 0.4, one float32 fine-tune, a 64-element tensor: mergekit keeps descending ranks
    [20, 64) (int(0.4 * 64) = 25 outliers shrink to 64 - 44 = 20); graft kept [19, 63)."""
    got = _run_config(_crumbs_config("breadcrumbs", grid_models, [(0.7, 0.4)], [1.0]), str(tmp_path / "out"))
    name = "model.extra.n64.weight"
    base, ft = load_dir(grid_models["base"])[name].double(), load_dir(grid_models["ft0"])[name].double()
    delta = ft - base
    kept = (got[name].double() - base) != 0
    ranks = torch.argsort(-delta.abs())
    assert kept[ranks[20:]].all() and not kept[ranks[:20]].any()
    assert torch.equal(got[name].double()[kept], ft[kept])


# --- the CLI reads a hostile file as the API does -------------------------------------------------------

_HEAD = "merge_method: task_arithmetic\nbase_model: /m/base\nmodels:\n  - model: /m/ft\n    parameters:\n"


@pytest.mark.parametrize("text, says", [
    (_HEAD + "      weight: " + "9" * 5000 + "\n", "5000 characters"),
    (_HEAD + "      weight: 1\ndtype: 2001-13-45\n", "date"),
    (_HEAD + "      weight: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    (_HEAD + "      weight: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested"),
    ("merge_method: linear\nbase_model: /m/base\nmodels:\n  - model: /m/base\n    parameters: {weight: 1e308}\n"
     "  - model: /m/a\n    parameters: {weight: 1e308}\n  - model: /m/b\n    parameters: {weight: -1e308}\n",
     "range of a float"),
    (_HEAD + "      weight: 1\ndtype: 2001-01-01\n", "a date or time"),
], ids=["huge_int", "impossible_date", "brackets", "mappings", "linear_overflow", "date"])
def test_the_cli_refuses_hostile_yaml_cleanly(tmp_path, text, says):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    graft = os.path.join(os.path.dirname(sys.executable), "graft")
    proc = subprocess.run([graft, "run", "--mergekit-config", str(cfg), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[invalid_recipe]" in proc.stderr and "mergekit config" in proc.stderr and says in proc.stderr, \
        proc.stderr[-500:]
