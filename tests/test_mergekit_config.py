"""mergekit configs of the task-vector family read as recipes: each method's mapping (mergekit 0.1.5's
defaults for normalize and rescale), weight lists, top-level fallbacks, dtypes, model references, refusals
naming the key, and one mapped TIES config run end to end on tiny models against a float64 reference of
mergekit's formula written here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from graft_helpers import correctly_rounded, load_dir, ulp_error

from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.mergekit_config import recipe_from_mergekit
from worker.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.settings import Settings

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
    assert r["merge"] == {"method": "dare_ties", "density": 0.3, "seed": 0, "normalize": False, "lambda": 1.0}
    r = _mapped(_config("dare_ties", {"weight": 1, "density": 0.3}, {"weight": 1}))
    assert r["merge"]["density"] == 1.0
    assert [d["transform"] for d in r["diffs"]] == [{"method": "dare", "drop": pytest.approx(0.7), "seed": 0},
                                                    None]


def test_dare_linear_is_a_sum_of_dared_diffs():
    r = _mapped(_config("dare_linear", {"weight": 1, "density": 0.25}, {"weight": 2, "density": 0.5}))
    assert r["merge"] == {"method": "sum", "normalize": False, "lambda": 1.0}
    assert [d["transform"]["drop"] for d in r["diffs"]] == [0.75, 0.5]


def test_breadcrumbs_and_breadcrumbs_ties():
    r = _mapped(_config("breadcrumbs", {"weight": 1, "density": 0.5, "gamma": 0.05}, {"weight": 1, "density": 0.5}))
    assert r["merge"]["method"] == "sum" and r["merge"]["normalize"] is False
    assert [d["transform"] for d in r["diffs"]] == [{"method": "breadcrumbs", "density": 0.5, "gamma": 0.05},
                                                    {"method": "breadcrumbs", "density": 0.5, "gamma": 0.01}]
    r = _mapped(_config("breadcrumbs_ties", {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}))
    assert r["merge"] == {"method": "ties", "density": 1.0, "normalize": False, "lambda": 1.0}
    assert all(d["transform"]["method"] == "breadcrumbs" for d in r["diffs"])


def test_breadcrumbs_outliers_shrink_to_keep_the_density_as_mergekit_does():
    r = _mapped(_config("breadcrumbs", {"weight": 1, "density": 0.9, "gamma": 0.3}, {"weight": 1, "density": 1}))
    assert r["diffs"][0]["transform"]["gamma"] == pytest.approx(0.1)
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


def test_weight_lists_interpolate_and_constant_density_lists_are_scalars():
    r = _mapped(_config("ties", {"weight": [0.0, 0.5, 1.0], "density": [0.3, 0.3]}, {"weight": 1, "density": 0.3}))
    assert r["diffs"][0]["weight"] == [0.0, 0.5, 1.0]
    assert r["merge"]["density"] == 0.3
    assert "per-layer" in _refused(_config("ties", {"weight": 1, "density": [0.2, 0.4]}))


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
    ({"merge_method": "della"}, "merge_method"),
    ({"merge_method": None}, "merge_method"),
    ({"base_model": None}, "base_model"),
    ({"slices": [{"sources": []}]}, "slices"),
    ({"modules": {}}, "modules"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"merge_options": {}}, "merge_options"),
    ({"parameters": {"rescale": True}}, "parameters.rescale"),
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
    ("ties", {"weight": [{"filter": "mlp", "value": 1}]}, "models[1].parameters.weight.filter"),
    ("ties", {"weight": 1, "normalize": True}, "models[1].parameters.normalize"),
    ("breadcrumbs", {"weight": 1, "density": 0.5, "gamma": 1.5}, "models[1].parameters.gamma"),
    ("linear", {"weight": 1, "density": 0.5}, "models[1].parameters.density"),
])
def test_refused_model_parameters(method, p1, key):
    assert f": {key}:" in _refused(_config(method, p1))


def test_refused_models_and_semantics():
    cfg = _config("dare_ties", {"weight": 1, "density": 0.5}, parameters={"rescale": False})
    assert "parameters.rescale" in _refused(cfg)
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
    result = run_graft(GraftRequest.from_recipe(recipe_from_mergekit(cfg), out), settings=Settings())
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
    cfg.write_text(yaml.safe_dump(_config("ties", {"weight": 1, "density": 0.5}, tokenizer_source="union")))
    graft = os.path.join(os.path.dirname(sys.executable), "graft")
    proc = subprocess.run([graft, "run", "--mergekit-config", str(cfg), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[invalid_recipe]" in proc.stderr and "tokenizer_source" in proc.stderr
    assert not (tmp_path / "out").exists()
