"""mergekit YAML from a hostile (or careless) tenant: whatever PyYAML or the converter cannot take is
GraftError("invalid_recipe"), which the API answers 422 naming `mergekit_config` on POST /v1/jobs,
/v1/jobs:preview and /v1/preflights (each was a 500: int conversion limit, YAML timestamps, RecursionError,
OverflowError in fsum). Besides the issue's inputs, the rest of their classes: other non-JSON YAML types,
nesting by every YAML syntax, alias expansion, configs parsed elsewhere (the CLI's dicts)."""

from __future__ import annotations

import datetime
import os

import pytest
from service_fixtures import Service

from worker.engine.errors import GraftError
from worker.engine.planning.mergekit_config import MAX_DEPTH, MAX_VALUES, load_yaml, recipe_from_mergekit

HEAD = "merge_method: task_arithmetic\nbase_model: /m/base\nmodels:\n  - model: /m/ft\n    parameters:\n"


def _weight(text: str) -> str:
    return HEAD + f"      weight: {text}\n"


def _linear(*weights: str) -> str:
    models = [("/m/base", weights[0]), *((f"/m/ft{i}", w) for i, w in enumerate(weights[1:]))]
    return "merge_method: linear\nbase_model: /m/base\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in models)


# The issue's inputs, each a 500 on every route before.
ISSUE_INPUTS = {
    "huge_int": _weight("9" * 5000),
    "impossible_date": _weight("1") + "dtype: 2001-13-45\n",
    "brackets": _weight("[" * 5000 + "]" * 5000),
    "mappings": _weight("{a: " * 3000 + "1" + "}" * 3000),
    "linear_overflow": _linear("1e308", "1e308", "-1e308"),
}


def _refused(config, *, says: str) -> str:
    with pytest.raises(GraftError) as err:
        recipe_from_mergekit(config)
    assert err.value.code == "invalid_recipe"
    assert err.value.message.startswith("mergekit config"), err.value.message
    assert says in err.value.message, err.value.message
    return err.value.message


# --- the converter ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, says", [
    ("huge_int", "line 6, column 15: an integer of 5000 characters"),
    ("impossible_date", "line 7, column 8: a date or time (YAML timestamp) '2001-13-45'"),
    ("brackets", f"collections nested deeper than {MAX_DEPTH} levels"),
    ("mappings", f"collections nested deeper than {MAX_DEPTH} levels"),
    ("linear_overflow", "models: the weights' sum passes the range of a float"),
])
def test_the_issues_inputs_are_invalid_recipes(name, says):
    _refused(ISSUE_INPUTS[name], says=says)


@pytest.mark.parametrize("text, says", [
    (_weight("2001-01-01"), "a date or time"),  # a valid date is no more a weight than an impossible one
    (_weight("2001-12-14t21:59:43.10-05:00"), "a date or time"),
    (_weight("!!timestamp 2001-01-01"), "a date or time"),
    (_weight("!!binary aGVsbG8="), "binary data"),
    (_weight("!!set {a, b}"), "a set"),
    (_weight("!!omap [{a: 1}]"), "an ordered mapping"),
    (_weight("!!pairs [{a: 1}]"), "a list of pairs"),
    (_weight("!!int ''"), "'' is not an integer"),
    (_weight("!!int x"), "'x' is not an integer"),
    (_weight("!!bool maybe"), "'maybe' is not true or false"),
    (_weight("!!float abc"), "'abc' is not a number"),
    (_weight("1" + "0" * 350), "a number past the range of a float"),
    (_weight("0x" + "f" * 500), "an integer of 502 characters"),
    (_weight("1.0e999"), "expected a finite number, got inf"),
    (_weight("1e999"), "expected a finite number, got inf"),  # a string to YAML, a number to mergekit
    (_weight("-.inf"), "expected a finite number, got -inf"),
    (_weight(".nan"), "expected a finite number, got nan"),
    (_linear("1e-7", "1e308", "-1e308"), "models[1].parameters.weight: divided by the weights' sum"),
    (HEAD + "      1: 1\n", "a mapping key must be a string (quote it), not int '1'"),
    (HEAD + "      ~: 1\n", "a mapping key must be a string"),
    (HEAD + "      ? [weight]\n      : 1\n", "a mapping key must be a string (quote it), not a list"),
    (HEAD.replace("/m/ft", '"/m/\\ud800"') + "      weight: 1\n", "lone surrogate"),
    (HEAD + "      weight:\n        " + "- " * 5000 + "1\n", "nested deeper"),  # two characters a level
    (_weight("&a [*a]"), "the alias *a is used inside what it names"),
    ("a: &a {b: *a}\n", "the alias *a is used inside what it names"),
    # PyYAML keeps a repeated key's last value without a word (task_arithmetic here, ties read first)
    ("merge_method: ties\n" + HEAD, "the key 'merge_method' appears twice in one mapping"),
    (HEAD + "      weight: 1\n      weight: 2\n", "the key 'weight' appears twice"),
])
def test_non_json_yaml_is_refused_by_name(text, says):
    _refused(text, says=says)


def _laughs(levels: int) -> str:
    """Each level a list of nine aliases of the one before: 9**levels values from a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _merge_keys(levels: int) -> str:
    """Each level merges nine aliases of the one before: PyYAML's flatten_mapping copies the pairs each time."""
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}"]
    lines += [f"l{i}: &l{i} {{<<: [" + ", ".join([f"*l{i - 1}"] * 9) + "]}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [_laughs(9), _merge_keys(9)], ids=["billion_laughs", "merge_keys"])
def test_aliases_cannot_expand_a_page_into_gigabytes(text):
    assert len(text) < 2000
    _refused(text, says=f"more than {MAX_VALUES} values")


def test_real_configs_nest_shallowly_and_may_use_anchors():
    """The bounds leave room: an anchored parameter block reused, a merge key, a 64-deep document."""
    text = """
merge_method: ties
base_model: /m/base
defaults: &p {weight: 0.5, density: 0.3}
models:
  - model: /m/a
    parameters: *p
  - model: /m/b
    parameters: {<<: *p, weight: 0.25}
""".replace("defaults: &p", "parameters: &p")
    recipe = recipe_from_mergekit(text).to_dict()
    assert [d["weight"] for d in recipe["diffs"]] == [0.5, 0.25]
    assert recipe["merge"]["density"] == 0.3
    assert load_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH) == _deep_list(MAX_DEPTH - 1)
    with pytest.raises(GraftError, match="nested deeper"):
        load_yaml("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    rows = load_yaml("row: &r [" + ", ".join(["1"] * 1000) + "]\nrows: [" + ", ".join(["*r"] * 50) + "]\n")
    assert len(rows["rows"]) == 50 and rows["rows"][49] == [1] * 1000  # about 51,000 values: within MAX_VALUES


def test_json_surrogate_pair_escapes_are_one_character():
    """JSON writes an astral character as two escapes; PyYAML decodes them apart (two lone surrogates, which
    no URI or response can carry): the loader joins them, and a lone one stays refused above."""
    text = HEAD.replace("/m/ft", '"/m/ft-\\ud83d\\ude00"') + "      weight: 1\n"
    assert recipe_from_mergekit(text).diffs[0].source_finetuned == "/m/ft-\U0001f600"


def _deep_list(depth: int) -> list:
    root = node = []
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


def _parsed(**top) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": "/m/base", **top}


def _weighted(weight) -> dict:
    return _parsed(models=[{"model": "/m/ft", "parameters": {"weight": weight}}])


def _cyclic() -> dict:
    models: list = []
    models.append(models)
    return _parsed(models=models)


def _shared() -> dict:
    """A million values from two thousand references (a parsed billion laughs)."""
    row = ["x"] * 1000
    return _parsed(models=["/m/ft"], parameters={"weight": [row] * 1000})


@pytest.mark.parametrize("config, says", [
    (lambda: _parsed(dtype=datetime.date(2001, 1, 1), models=["/m/ft"]), "mergekit config: dtype: a date or time"),
    (lambda: _weighted(datetime.datetime(2001, 1, 1)), "models[0].parameters.weight: a date or time"),
    (lambda: _weighted(b"1"), "models[0].parameters.weight: binary data"),
    (lambda: _weighted({1, 2}), "a set"),
    (lambda: _weighted((1, 2)), "a tuple"),
    (lambda: _weighted(10**400), "past the range of a float"),
    (lambda: {**_parsed(models=["/m/ft"]), 3: 1}, "a mapping key must be a string, not int '3'"),
    (lambda: _parsed(models=_deep_list(100_000)), "nested deeper"),
    (_cyclic, "nested deeper"),
    (_shared, f"more than {MAX_VALUES} values"),
], ids=["date", "datetime", "bytes", "set", "tuple", "huge_int", "int_key", "deep", "cyclic", "shared"])
def test_parsed_configs_get_the_same_refusals(config, says):
    """What the CLI hands over after its own yaml.safe_load (dates built, any depth a dict can have)."""
    _refused(config(), says=says)


# --- the API ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(redis_url, tmp_path_factory):
    """No worker: nothing is meant to get as far as the queue."""
    root = str(tmp_path_factory.mktemp("mergekit-hostile"))
    service = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=root, GRAFT_PREVIEW_WORKERS=1)
    try:
        yield service.start_api()
    finally:
        service.stop()


ROUTES = ("/v1/jobs", "/v1/jobs:preview", "/v1/preflights")


@pytest.mark.parametrize("name", sorted(ISSUE_INPUTS))
def test_each_route_answers_422_naming_mergekit_config(api, name):
    text = ISSUE_INPUTS[name]
    assert len(text) <= 64 << 10  # inside the schema's cap on mergekit_config
    with api.client() as c:
        for route in ROUTES:
            resp = c.post(route, json={"mergekit_config": text})
            assert resp.status_code == 422, (route, resp.status_code, resp.text[:500])
            assert resp.headers["content-type"].startswith("application/problem+json")
            errors = resp.json()["errors"]
            assert [(e["field"], e["type"]) for e in errors] == [("mergekit_config", "invalid_recipe")], (route, errors)
            assert errors[0]["message"].startswith("mergekit config"), errors


def test_a_stage_is_chosen_by_mergekit_stage(api):
    """`mergekit_stage` picks a stage of a multi-stage file (the preview plans it); alone it names nothing."""
    stage = ("name: {name}\nmerge_method: task_arithmetic\nbase_model: {root}/base\n"
             "models: [{{model: {root}/ft, parameters: {{weight: 0.5}}}}]\n")
    text = stage.format(name="one", root=api.root) + "---\n" + stage.format(name="two", root=api.root)
    with api.client() as c:
        for route in ROUTES:
            resp = c.post(route, json={"mergekit_config": text, "mergekit_stage": "three"})
            assert resp.status_code == 422, (route, resp.text[:300])
            assert "no stage named 'three' (stages: 'one', 'two')" in resp.json()["errors"][0]["message"]
            resp = c.post(route, json={"mergekit_stage": "one"})
            assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "mergekit_stage", resp.text[:300]


def test_no_job_was_queued_for_a_refused_config(api):
    with api.client() as c:
        for text in ISSUE_INPUTS.values():
            c.post("/v1/jobs", json={"mergekit_config": text})
        assert c.get("/v1/jobs").json()["data"] == []
    assert not os.listdir(os.path.join(api.root, "outputs"))
