"""An imported mergekit config means what mergekit says it means, and says where graft still computes
otherwise: weight lists give every tensor outside the layers the first value (mergekit plans them at t = 0)
and a one-layer model's layer the last (t = 1); the tokenizer, chat template and generation config come from
base_model, as mergekit copies them; what remains different (DARE's rescale and draw, ties at a threshold, the
compute dtype) is a warning at run time, in the dry-run plan and in the manifest. graft's own recipes keep
graft's choices. References: mergekit's `evaluate_setting` and planner, written here in float64."""

from __future__ import annotations

import json
import os

import pytest
from graft_helpers import load_dir, ulp

from worker.devtools.sample_models import LlamaShape, chat_tokenizer_files, llama_state, perturb, save_checkpoint
from worker.engine import GraftRequest, run_graft
from worker.engine.pipeline.resolve import close_models, plan_graft
from worker.engine.planning.mergekit_config import recipe_from_mergekit
from worker.engine.planning.recipe import LAYER_INDEX, load_recipe
from worker.service.settings import Settings

WEIGHTS = [0.2, 0.5, 0.8]


def _family(root, layers: int) -> dict[str, str]:
    shape = LlamaShape(layers=layers)
    base = llama_state(shape, seed=60)
    paths = {}
    for name, state, gen in (("base", base, {"bos_token_id": 1, "eos_token_id": 2}),
                             ("ft", perturb(base, seed=61, scale=0.05), {"bos_token_id": 1, "eos_token_id": [2, 3]})):
        paths[name] = save_checkpoint(os.path.join(root, name), state, shape.config(), tokenizer=chat_tokenizer_files(
            name), generation_config=gen)
    return paths


def _mergekit_t(name: str, layers: int) -> float:
    """mergekit's planner: layer i of L at i / (L - 1) (1 when L == 1); pre- and post-layer weights at 0."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def _evaluate_setting(values: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _assert_weights(out: str, paths: dict, weight_of) -> None:
    got, base, ft = load_dir(out), load_dir(paths["base"]), load_dir(paths["ft"])
    assert got.keys() == base.keys()
    for name, value in got.items():
        w = weight_of(name)
        delta = ft[name].double() - base[name].double()
        ref = base[name].double() + w * delta
        scale = base[name].double().abs() + abs(w) * (ft[name].double().abs() + base[name].double().abs())
        bound = ulp(ref, value.dtype) + 4 * 2.0 ** -24 * scale
        assert bool(((value.double() - ref).abs() <= bound).all()), (name, w)


def _config(paths: dict, weight, method: str = "task_arithmetic", extra: str = "") -> str:
    return (f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['ft']}\n"
            f"    parameters: {{weight: {json.dumps(weight)}{extra}}}\n")


@pytest.mark.parametrize("layers", [3, 1])
def test_weight_lists_follow_mergekit_in_an_imported_config(tmp_path, layers):
    paths = _family(str(tmp_path), layers)
    out = str(tmp_path / "out")
    run_graft(GraftRequest(recipe_from_mergekit(_config(paths, WEIGHTS)), out), settings=Settings())
    _assert_weights(out, paths, lambda name: _evaluate_setting(WEIGHTS, _mergekit_t(name, layers)))
    head = {"lm_head.weight", "model.norm.weight"}
    assert head <= set(load_dir(out))  # the ends this is about are there


def test_graft_recipes_keep_grafts_weight_list_ends(tmp_path):
    """The same list in graft's own recipe: the final norm and head take the last value (as documented)."""
    paths = _family(str(tmp_path), 3)
    out = str(tmp_path / "out")
    recipe = load_recipe({"target_base": paths["base"], "diffs": [
        {"source_base": paths["base"], "source_finetuned": paths["ft"], "weight": WEIGHTS}]})
    run_graft(GraftRequest(recipe, out), settings=Settings())

    def graft_weight(name: str) -> float:
        if LAYER_INDEX.search(name) is None:
            return WEIGHTS[0] if "embed" in name else WEIGHTS[-1]
        return _evaluate_setting(WEIGHTS, int(LAYER_INDEX.search(name).group(1)) / 2)

    _assert_weights(out, paths, graft_weight)


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as fh:
        return fh.read()


def test_tokenizer_and_generation_config_come_from_base_model(tmp_path):
    """mergekit copies base_model's tokenizer files and generation config; a one-model task_arithmetic config
    used to take the fine-tune's (it ran as graft's plain transfer)."""
    paths = _family(str(tmp_path), 2)
    imported, own = str(tmp_path / "imported"), str(tmp_path / "own")
    run_graft(GraftRequest(recipe_from_mergekit(_config(paths, 1.0)), imported), settings=Settings())
    recipe = load_recipe({"target_base": paths["base"], "diffs": [
        {"source_base": paths["base"], "source_finetuned": paths["ft"], "weight": 1.0}]})
    run_graft(GraftRequest(recipe, own), settings=Settings())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert _read(imported, name) == _read(paths["base"], name), name
        assert _read(own, name) == _read(paths["ft"], name), name
    assert "from the target base (mergekit's conventions)" in _read(imported, "README.md")


@pytest.mark.parametrize("method, extra, dtype, reasons", [
    # dare's rescale is mergekit's now (the L1 rescale): only the draw still differs.
    ("dare_linear", ", density: 0.5", None, {"dare_draw", "compute_dtype"}),
    ("ties", ", density: 0.5", "float32", {"threshold_ties"}),
    ("breadcrumbs", ", density: 0.5, gamma: 0", "bfloat16", {"threshold_ties", "compute_dtype"}),
    ("task_arithmetic", "", "float32", set()),
])
def test_what_still_differs_is_said_in_the_plan_the_events_and_the_manifest(tmp_path, method, extra, dtype,
                                                                             reasons):
    paths = _family(str(tmp_path), 2)
    config = _config(paths, 1.0, method, extra) + (f"dtype: {dtype}\n" if dtype else "")
    out = str(tmp_path / "out")
    request = GraftRequest(recipe_from_mergekit(config), out)
    plan, models = plan_graft(request)
    close_models(models)
    planned = {w["reason"] for w in plan.warnings if w["code"] == "foreign_semantics"}
    warned: list[dict] = []
    result = run_graft(request, settings=Settings(), warn=warned.append)
    said = {w["reason"] for w in warned if w["code"] == "foreign_semantics"}
    recorded = {w["reason"] for w in result.manifest["warnings"] if w["code"] == "foreign_semantics"}
    assert planned == said == recorded == reasons
    with open(os.path.join(out, "graft-manifest.json")) as fh:
        assert {n["code"] for n in json.load(fh)["recipe"]["notes"]} == reasons


def test_a_one_model_config_is_not_grafts_plain_transfer(tmp_path):
    """Its conventions travel with it (the plain path has no recipe to carry them), so a sweep or an API job
    keeps mergekit's meaning."""
    paths = _family(str(tmp_path), 2)
    recipe = recipe_from_mergekit(_config(paths, 0.3))
    assert recipe.plain_alpha() is None and recipe.conventions == "mergekit"
    request = GraftRequest(recipe, str(tmp_path / "out"))
    assert request.recipe is recipe
