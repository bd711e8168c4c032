"""mergekit configs as users write them: filter lists, gradients of every parameter, slices, linear without a
base_model, tokenizer_source, chat_template and multi-stage files, each mapped to the recipe that computes
what mergekit 0.1.5 computes, run through the engine on tiny models against float64 references of mergekit's
code written here (its evaluate_setting, parameter scopes, planner's t, magnitude trim, TIES vote, linear),
and each refusal's message. Also the rule synthesis itself: for random settings and names, the first
matching rule gives every diff what mergekit's lookup gives it."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from graft_helpers import load_dir, ulp

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.planning.mergekit_config import recipe_from_mergekit
from worker.engine.planning.mergekit_settings import contains_all, decision_list, lookup, read_setting, regions
from worker.engine.planning.patterns import matches_any
from worker.engine.planning.recipe import LAYER_INDEX
from worker.service.settings import Settings

LAYERS = 4


# --- mergekit, in float64 --------------------------------------------------------------------------------

def _t(name: str, layers: int = LAYERS) -> float:
    """mergekit's planner: layer i of L at i / (L - 1); everything outside the layers at 0."""
    match = LAYER_INDEX.search(name)
    return 0.0 if match is None else int(match.group(1)) / (layers - 1)


def _setting(value, name: str, t: float):
    """mergekit's evaluate_setting: a number, a gradient, or the first {filter, value} whose filter is in the
    name (None when none is)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for cond in value:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return _setting(cond["value"], name, t)
        return None
    if isinstance(value, list):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    return float(value)


def _param(scopes: list[dict | None], key: str, name: str, default=None):
    for scope in scopes:
        if scope and key in scope:
            value = _setting(scope[key], name, _t(name))
            if value is not None:
                return value
    return default


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    flat = delta.flatten()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat)
    order = torch.sort(-flat.abs(), stable=True).indices[:k]
    keep[order] = flat[order]
    return keep.reshape(delta.shape)


def _ties(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    stack = torch.stack([d * w for d, w in zip(deltas, weights, strict=True)])
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    joins = (stack != 0) & (torch.sign(stack) == sign)
    mixed = (stack * joins).sum(0)
    if normalize:
        divisor = (joins * torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim())).sum(0)
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return base + mixed


# --- models -----------------------------------------------------------------------------------------------

def _words(n: int) -> list[str]:
    return ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, n))]


def _tokenizer(tokens: list[str], marker: str) -> dict:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ '" + marker + "' }}"}}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """float32 Llama stand-ins (distinct delta magnitudes: no threshold ties), four layers, real tokenizers;
    `swapped` numbers two tokens the other way round, `chat` adds two tokens (and rows), `deep` has five layers."""
    root = tmp_path_factory.mktemp("forms")
    shape = LlamaShape(layers=LAYERS)
    base = llama_state(shape, seed=70, dtype=torch.float32)
    words = _words(shape.vocab)
    swapped = list(words)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    made = {"base": (base, words), "ft1": (perturb(base, seed=71), words), "ft2": (perturb(base, seed=72), words),
            "swapped": (perturb(base, seed=73), swapped),
            "chat": (perturb(base, seed=75, extra_rows=2), [*words, "<|im_start|>", "<|im_end|>"])}
    paths = {n: save_checkpoint(str(root / n), s, shape.config(vocab=len(v)), tokenizer=_tokenizer(v, n))
             for n, (s, v) in made.items()}
    deep = LlamaShape(layers=LAYERS + 1)
    paths["deep"] = save_checkpoint(str(root / "deep"), llama_state(deep, seed=74, dtype=torch.float32),
                                    deep.config(), tokenizer=_tokenizer(words, "deep"))
    return paths


def _run(cfg: str, out: str, **kw) -> dict[str, torch.Tensor]:
    run_graft(GraftRequest(recipe_from_mergekit(cfg, **kw), out), settings=Settings())
    return load_dir(out)


def _assert_close(got: dict, refs: dict, scales: dict) -> None:
    """Within 1 ulp of the float64 reference, plus float32's rounding of the operands (`scales`: the sum of
    their magnitudes), which is all that remains where the result cancels to near zero."""
    assert got.keys() == refs.keys()
    for name, ref in refs.items():
        bound = ulp(ref, got[name].dtype) + 8 * 2.0**-24 * scales[name]
        assert bool(((got[name].double() - ref).abs() <= bound).all()), name


def _scale(base: torch.Tensor, fts: list[torch.Tensor], factor: float = 1.0) -> torch.Tensor:
    return base.abs() + factor * sum(ft.abs() + base.abs() for ft in fts)


def _states(family: dict, *names: str) -> list[dict]:
    return [{k: v.double() for k, v in load_dir(family[n]).items()} for n in names]


# --- forms ------------------------------------------------------------------------------------------------

TIES_SETTINGS = {
    "ft1": {"density": [1, 0.7, 0.1], "weight": 1.0},
    "ft2": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
            "weight": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.5}]},
}


def test_filter_lists_and_gradients_of_weight_and_density_are_mergekits(family, tmp_path):
    """mergekit's examples/ties.yml shape: a density gradient, a filtered density, a filtered weight gradient."""
    cfg = (f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
           + "".join(f"  - model: {family[n]}\n    parameters: {json.dumps(p)}\n" for n, p in TIES_SETTINGS.items())
           + "parameters: {normalize: true}\ndtype: float32\nout_dtype: bfloat16\n")
    recipe = recipe_from_mergekit(cfg)
    assert recipe.rules and all(rule.diffs for rule in recipe.rules)
    got = _run(cfg, str(tmp_path / "out"))
    base, ft1, ft2 = _states(family, "base", "ft1", "ft2")
    refs = {}
    for name in base:
        deltas, weights = [], []
        for ft, p in ((ft1, TIES_SETTINGS["ft1"]), (ft2, TIES_SETTINGS["ft2"])):
            deltas.append(_trim(ft[name] - base[name], _param([p], "density", name, 1.0)))
            weights.append(_param([p], "weight", name))
        refs[name] = _ties(base[name], deltas, weights, normalize=True)
    _assert_close(got, refs, {n: _scale(base[n], [ft1[n], ft2[n]]) for n in base})


def test_lambda_gradient_folds_into_the_weights_and_scopes_fall_through(family, tmp_path):
    """A model's filter without a fallback falls through to the top level's weight gradient, as mergekit's
    scopes do; a lambda by filter and over the layers is mergekit's, applied after the sum."""
    own = {"weight": [{"filter": "mlp", "value": 0.9}]}
    top = {"weight": 0.3, "lambda": [{"filter": "lm_head", "value": 0.5}, {"value": [0.6, 1.2]}]}
    cfg = (f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
           f"  - model: {family['ft1']}\n    parameters: {json.dumps(own)}\n  - model: {family['ft2']}\n"
           f"parameters: {json.dumps(top)}\ndtype: float32\n")
    got = _run(cfg, str(tmp_path / "out"))
    base, ft1, ft2 = _states(family, "base", "ft1", "ft2")
    refs = {}
    for name in base:
        w1, w2 = _param([own, top], "weight", name), _param([top], "weight", name)
        lam = _param([top], "lambda", name)
        refs[name] = base[name] + lam * (w1 * (ft1[name] - base[name]) + w2 * (ft2[name] - base[name]))
    _assert_close(got, refs, {n: _scale(base[n], [ft1[n], ft2[n]], 1.2) for n in base})


def _slice_cfg(family: dict, layer_range: list[int], base: str = "base") -> str:
    return (f"slices:\n  - sources:\n      - model: {family[base]}\n        layer_range: {layer_range}\n"
            f"      - model: {family['ft1']}\n        layer_range: {layer_range}\n"
            "        parameters: {weight: [0.0, 1.0]}\n"
            f"merge_method: task_arithmetic\nbase_model: {family[base]}\ndtype: float32\n")


def test_a_slice_over_every_layer_is_the_models_form_and_fixes_the_depth(family, tmp_path):
    got = _run(_slice_cfg(family, [0, LAYERS]), str(tmp_path / "out"))
    base, ft1 = _states(family, "base", "ft1")
    _assert_close(got, {n: base[n] + _setting([0.0, 1.0], n, _t(n)) * (ft1[n] - base[n]) for n in base},
                  {n: _scale(base[n], [ft1[n]]) for n in base})
    with pytest.raises(GraftError, match="written for 4 layers .* the target has 5"):  # mergekit: a cut model
        _run(_slice_cfg(family, [0, LAYERS], base="deep").replace(family["ft1"], family["deep"], 0),
             str(tmp_path / "deep"))


def test_linear_without_base_model_is_the_transfer_its_weights_say(family, tmp_path):
    cfg = (f"merge_method: linear\nmodels:\n  - model: {family['ft2']}\n    parameters: {{weight: 1.0}}\n"
           f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0}}\n"
           f"  - model: {family['base']}\n    parameters: {{weight: -1.0}}\nparameters: {{normalize: false}}\n"
           "dtype: float32\nout_dtype: bfloat16\n")
    recipe = recipe_from_mergekit(cfg)
    assert recipe.target_base == family["ft2"] and recipe.diffs[0].source_base == family["base"]
    got = _run(cfg, str(tmp_path / "out"))
    base, ft1, ft2 = _states(family, "base", "ft1", "ft2")
    _assert_close(got, {n: ft2[n] + ft1[n] - base[n] for n in base},  # mergekit's sum_i w_i m_i
                  {n: _scale(ft2[n], [ft1[n]]) for n in base})


def _tok_cfg(family: dict, ft: str, source: str, extra: str = "") -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family[ft]}\n    parameters: {{weight: 0.5}}\ntokenizer_source: {source}\n"
            f"dtype: float32\n{extra}")


def test_tokenizer_source_base_takes_the_base_tokenizer_and_a_chat_template(family, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    out = tmp_path / "out"
    got = _run(_tok_cfg(family, "ft1", "base", f"chat_template: {json.dumps(template)}\n"), str(out))
    base, ft1 = _states(family, "base", "ft1")
    _assert_close(got, {n: base[n] + 0.5 * (ft1[n] - base[n]) for n in base}, {n: _scale(base[n], [ft1[n]])
                                                                              for n in base})
    with open(out / "tokenizer.json") as fh, open(os.path.join(family["base"], "tokenizer.json")) as ref:
        assert fh.read() == ref.read()
    assert (out / "chat_template.jinja").read_text() == template
    # A model of the merge as the source: its tokenizer files.
    _run(_tok_cfg(family, "ft1", family["ft1"]), str(tmp_path / "named"))
    assert "ft1" in (tmp_path / "named" / "tokenizer_config.json").read_text()
    # A fine-tune that added tokens at the end, into the base's vocabulary: its extra rows dropped, as
    # mergekit drops the tokens the output tokenizer lacks.
    got = _run(_tok_cfg(family, "chat", "base"), str(tmp_path / "chat"))
    (chat,) = _states(family, "chat")
    rows = {n: (t[:base[n].shape[0]] if t.shape[0] != base[n].shape[0] else t) for n, t in chat.items()}
    _assert_close(got, {n: base[n] + 0.5 * (rows[n] - base[n]) for n in base},
                  {n: _scale(base[n], [rows[n]]) for n in base})


def test_tokenizer_sources_that_would_reassign_ids_are_refused(family, tmp_path):
    with pytest.raises(GraftError, match="gives 'w5' id 5 and .*swapped gives it id 6: mergekit would re-map"):
        _run(_tok_cfg(family, "swapped", "base"), str(tmp_path / "out"))
    with pytest.raises(GraftError, match=re.escape("chat has '<|im_start|>', which ") + ".*base's tokenizer lacks"):
        _run(_tok_cfg(family, "chat", "union"), str(tmp_path / "out2"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def _refused(cfg: str, **kw) -> str:
    with pytest.raises(GraftError) as err:
        recipe_from_mergekit(cfg, **kw)
    assert err.value.code == "invalid_recipe"
    return err.value.message


LINEAR = "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {weight: 1.0}\n" \
         "  - model: org/b\n    parameters: {weight: 0.3}\n"


@pytest.mark.parametrize("cfg, says", [
    (LINEAR, "base_model: linear without base_model: the weights [1.0, 0.3] are not a fine-tuning transfer "
             "(a target +1, fine-tunes +w and their base -w); add `base_model: org/a`"),
    ("merge_method: passthrough\nslices:\n  - sources:\n    - model: org/a\n      layer_range: [0, 4]\n",
     "merge_method: 'passthrough': passthrough copies or stacks layers (a frankenmerge)"),
    ("merge_method: task_arithmetic\nbase_model: org/a\nslices:\n  - sources:\n    - model: org/a\n"
     "      layer_range: [2, 4]\n    - model: org/b\n      layer_range: [2, 4]\n      parameters: {weight: 1}\n",
     "slices[0].sources: layer_range [2, 4] where layer 0 comes next: the output would lack or repeat layers"),
    ("merge_method: task_arithmetic\nbase_model: org/a\nslices:\n  - sources:\n    - model: org/a\n"
     "      layer_range: [0, 2]\n    - model: org/b\n      layer_range: [2, 4]\n      parameters: {weight: 1}\n",
     "slices[0].sources: the sources keep different layers [(0, 2), (2, 4)]"),
    ("name: one\nmerge_method: task_arithmetic\nbase_model: org/a\nmodels: [{model: org/b, parameters: {weight: 1}}]"
     "\n---\nmerge_method: ties\nbase_model: org/a\nmodels: [{model: one, parameters: {weight: 1}}]\n",
     "name: a multi-stage file (2 stages: 'one', the unnamed final merge)"),
    ("merge_method: task_arithmetic\nbase_model: org/a\nmodels: [{model: org/b, parameters: {weight: 1}}]\n"
     "chat_template: chatml\n", "chat_template: 'chatml' names one of mergekit's own templates"),
    ("merge_method: ties\nbase_model: org/a\nmodels: [{model: org/b, parameters: {weight: 1, density: 0.5}}]\n"
     "parameters: {lambda: [{filter: mlp, value: 0.5}, {value: 1}]}\n",
     "parameters.lambda[1].value: lambda differs between tensors (or is a list) with normalize on"),
    ("merge_method: task_arithmetic\nbase_model: org/a\nmodels: [{model: org/b, parameters: {weight: "
     "[{filter: mlp, value: 1}]}}]\n", "models[0].parameters.weight: required, and no value applies to tensors "
                                       "that match none of its filters"),
])
def test_refusals_name_what_is_not_expressible(cfg, says):
    assert says in _refused(cfg, resolve_local=False)


def test_a_stage_is_picked_by_name_and_may_not_read_another(family):
    first = (f"name: first\nmerge_method: task_arithmetic\nbase_model: {family['base']}\n"
             f"models: [{{model: {family['ft1']}, parameters: {{weight: 0.5}}}}]\n")
    second = (f"name: second\nmerge_method: ties\nbase_model: {family['base']}\n"
              "models: [{model: first, parameters: {weight: 1}}]\n")
    cfg = first + "---\n" + second
    assert recipe_from_mergekit(cfg, stage="first").diffs[0].source_finetuned == family["ft1"]
    assert recipe_from_mergekit(first).diffs[0].weight == 0.5  # one named stage: the name is a label
    assert "merges the output of stage 'first', which graft does not build" in _refused(cfg, stage="second")
    assert "no stage named 'third' (stages: 'first', 'second')" in _refused(cfg, stage="third")


# --- the rule synthesis ------------------------------------------------------------------------------------

PIECES = ["self_attn", "attn", "mlp", "proj", "q_proj", "layers.1", "norm", "s.1.", "_at"]


def _random_setting(rng: random.Random) -> object:
    if rng.random() < 0.3:
        return round(rng.random(), 3)
    conds = [{"filter": rng.choice(PIECES), "value": round(rng.random(), 3)} for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.6:
        conds.append({"value": round(rng.random(), 3)})
    return conds


def test_first_matching_rule_is_mergekits_lookup_for_every_name(family):
    names = list(load_dir(family["base"]))
    names += ["model.layers.1.self_attn.q_proj.weight_attn", "x.s.1.mlp_at"]
    rng = random.Random(5)
    for _ in range(60):
        settings = [read_setting(_random_setting(rng), f"m{i}") + [read_setting(0.0, "fallback")[0]]
                    for i in range(3)]
        filters = list(dict.fromkeys(e.filter for s in settings for e in s if e.filter))
        ordered = regions(filters, "p")
        default, rules = decision_list(ordered, lambda r, chains=settings: [lookup(s, r).value for s in chains])
        patterns = [(p, v) for region, v in rules for p in contains_all(region, "p")]
        for name in names:
            want = [next(e.value for e in s if e.filter is None or e.filter in name) for s in settings]
            hit = next((v for p, v in patterns if matches_any([p], name, "p")), default)
            assert hit == want, (name, settings)


def test_contains_all_is_exactly_containing_every_filter():
    rng = random.Random(9)
    alphabet = "ab."
    for _ in range(300):
        region = frozenset("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                           for _ in range(rng.randint(1, 3)))
        patterns = contains_all(region, "p")
        for _ in range(40):
            name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            assert matches_any(patterns, name, "p") == all(f in name for f in region), (region, name, patterns)


# --- methods mapped by name from the registry -----------------------------------------------------------------

def _registered(monkeypatch, table: dict, name: str, **fields) -> None:
    """A method the registry does not have yet, with mergekit's parameter names (the way new ones arrive)."""
    from types import SimpleNamespace
    from typing import Literal

    from pydantic import create_model

    params = create_model(f"{name}Params", method=(Literal[name], ...), **fields)
    monkeypatch.setitem(table, name, SimpleNamespace(Params=params))


def test_della_sce_and_rescale_map_by_name_once_the_registry_has_them(monkeypatch):
    from worker.engine.methods import MERGES, TRANSFORMS
    from worker.engine.planning.mergekit_methods import Scopes, Source, sce, task_vector

    models = [Source("/f1", "models[0]", {"weight": 1.0, "density": [0.5, 0.6], "epsilon": 0.1}),
              Source("/f2", "models[1]", {"weight": 0.5, "density": 0.4})]
    if "della" not in TRANSFORMS:
        with pytest.raises(GraftError, match="della: graft has no della transform"):
            task_vector("della", "/b", Scopes(models))
    _registered(monkeypatch, TRANSFORMS, "della", density=(float | list[float], ...), epsilon=(float, 0.15),
                rescale=(bool, True))
    parts = task_vector("della", "/b", Scopes(models))
    assert parts.merge == {"method": "ties", "normalize": True, "lambda": 1.0}  # mergekit's della defaults
    # mergekit's rescale (true) is this transform's default: left out, as graft's own defaults are.
    assert [d["transform"] for d in parts.diffs] == [
        {"method": "della", "density": [0.5, 0.6], "epsilon": 0.1},
        {"method": "della", "density": 0.4, "epsilon": 0.15}]
    assert task_vector("della_linear", "/b", Scopes(models)).merge["method"] == "sum"
    _registered(monkeypatch, TRANSFORMS, "dare", density=(float, ...), rescale=(bool, True))
    parts = task_vector("dare_linear", "/b", Scopes(models[1:], top={"rescale": False}))
    assert parts.diffs[0]["transform"] == {"method": "dare", "density": 0.4, "rescale": False}
    _registered(monkeypatch, MERGES, "sce", select_topk=(float, 1.0))
    parts = sce("/b", Scopes([Source("/f1", "models[0]", None), Source("/f2", "models[1]", None)],
                             top={"select_topk": 0.3}))
    assert parts.merge == {"method": "sce", "select_topk": 0.3} and [d["weight"] for d in parts.diffs] == [1.0, 1.0]


def test_a_method_registered_as_a_merge_takes_its_parameters_by_name(monkeypatch):
    from worker.engine.methods import MERGES, TRANSFORMS
    from worker.engine.planning.mergekit_methods import Scopes, Source, task_vector

    monkeypatch.delitem(TRANSFORMS, "della", raising=False)
    from pydantic import Field

    _registered(monkeypatch, MERGES, "della", density=(float, 1.0), epsilon=(float, 0.15), rescale=(bool, True),
                normalize=(bool, True), lambda_=(float, Field(1.0, alias="lambda")))
    shared = [Source(f"/f{i}", f"models[{i}]", {"weight": 1.0, "density": 0.5, "epsilon": 0.2}) for i in range(2)]
    parts = task_vector("della", "/b", Scopes(shared))
    assert parts.merge == {"method": "della", "density": 0.5, "epsilon": 0.2, "normalize": True, "rescale": True,
                           "lambda": 1.0}
    shared[1].params["density"] = 0.4
    with pytest.raises(GraftError, match="della merge takes one density for every model"):
        task_vector("della", "/b", Scopes(shared))


def test_a_rule_keeping_the_diffs_own_values_shadows_the_rules_after_it(family, tmp_path):
    """q_proj tensors (inside self_attn) take the first condition, which is the default: a rule of nulls must
    stop them from reaching the self_attn rule."""
    own = {"weight": [{"filter": "q_proj", "value": 1.0}, {"filter": "self_attn", "value": 0.2}, {"value": 1.0}]}
    cfg = (f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
           f"  - model: {family['ft1']}\n    parameters: {json.dumps(own)}\ndtype: float32\nout_dtype: bfloat16\n")
    rules = recipe_from_mergekit(cfg).rules
    assert [r.diffs for r in rules][0] == [None] and len(rules) == 2
    got = _run(cfg, str(tmp_path / "out"))
    base, ft1 = _states(family, "base", "ft1")
    _assert_close(got, {n: base[n] + _param([own], "weight", n) * (ft1[n] - base[n]) for n in base},
                  {n: _scale(base[n], [ft1[n]]) for n in base})


def test_the_cli_picks_a_stage_by_name(family, tmp_path, capsys):
    """`--mergekit-stage` reaches the converter; without a config it is refused, as is a stage graft cannot build."""
    from worker.cli import main

    first = (f"name: first\nmerge_method: task_arithmetic\nbase_model: {family['base']}\n"
             f"models: [{{model: {family['ft1']}, parameters: {{weight: 0.5}}}}]\n")
    second = (f"name: second\nmerge_method: ties\nbase_model: {family['base']}\n"
              "models: [{model: first, parameters: {weight: 1}}]\n")
    config = tmp_path / "stages.yml"
    config.write_text(first + "---\n" + second)
    assert main(["run", "--mergekit-config", str(config), "--mergekit-stage", "first", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["run", "--mergekit-config", str(config), "--mergekit-stage", "second", "--dry-run"]) == 2
    assert "merges the output of stage 'first'" in capsys.readouterr().err
    assert main(["run", "--mergekit-config", str(config), "--dry-run"]) == 2
    assert "stages: 'first', 'second'" in capsys.readouterr().err
    assert main(["run", "--mergekit-stage", "first", "--dry-run"]) == 2
    assert "--mergekit-stage names a stage of a --mergekit-config" in capsys.readouterr().err


def test_a_model_reference_takes_its_scheme_in_any_case():
    """`S3://` is an S3 URI, as the API's own URI fields read it, not a hub id or a local path."""
    recipe = recipe_from_mergekit("merge_method: task_arithmetic\nbase_model: S3://bk/base\n"
                                  "models: [{model: s3://bk/ft, parameters: {weight: 1}}]\n", resolve_local=False)
    assert recipe.target_base == "S3://bk/base" and recipe.diffs[0].source_finetuned == "s3://bk/ft"
