"""Alpha as one strength on the whole recipe, however the recipe came (issue: a sweep replaced a one-diff recipe's
weight instead of multiplying it, and alpha times a weight could overflow past the API into the worker).

Every published tensor is checked against `target + weight * alpha * (finetuned - base)` written here in float64,
and every candidate's score against transformers' float64 loss of that reference model saved by the test."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checks_models import PROBE, checks_family
from eval_helpers import encode, reference_loss, reference_model, save, tokenizer_files
from graft_helpers import load_dir, ulp
from service_fixtures import Service

from worker.engine import GraftError, GraftRequest, run_graft
from worker.engine.checks.checked_graft import Checks, run_checked_graft
from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.config import EngineSettings
from worker.engine.planning.mergekit_config import recipe_from_mergekit
from worker.engine.planning.recipe import load_recipe

SPEC = EvaluateSpec(probe_text=PROBE, prompts=["the cat"], max_new_tokens=2)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("strength")))


def _settings(tmp_path) -> EngineSettings:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return EngineSettings(cache_dir="", scratch_dir=str(scratch), probe_max_tokens=512)


def _reference_state(family, target: str, strength: float) -> dict[str, torch.Tensor]:
    """target + strength * (finetuned - base), in float64, every tensor."""
    t, s, f = (load_dir(family[role]) for role in (target, "base", "finetuned"))
    assert t.keys() == s.keys() == f.keys()
    return {k: t[k].double() + strength * (f[k].double() - s[k].double()) for k in t}


def _reference_score(family, target: str, strength: float, window: int, directory: str) -> float:
    """The probe loss of the reference model (its tensors stored in the inputs' dtypes), by transformers."""
    dtypes = {k: v.dtype for k, v in load_dir(family[target]).items()}
    state = {k: v.to(dtypes[k]) for k, v in _reference_state(family, target, strength).items()}
    save(directory, state, tokenizer=tokenizer_files())
    return reference_loss(reference_model(directory), encode(PROBE), window)


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """Within one rounding to the stored dtype (an ulp of the float64 reference) plus float32 accumulation's
    forward error (a few units of 2^-24 times the operands' magnitudes: where the sum cancels to near zero,
    ulps of the result alone are too fine a measure)."""
    bound = ulp(want, got.dtype) + 4 * 2.0 ** -24 * scale
    assert bool(((got.double() - want).abs() <= bound).all()), name


def _assert_published(out: str, family, target: str, strength: float) -> None:
    published = load_dir(out)
    reference = _reference_state(family, target, strength)
    t, s, f = (load_dir(family[role]) for role in (target, "base", "finetuned"))
    assert published.keys() == reference.keys()
    for name, want in reference.items():
        scale = t[name].double().abs() + abs(strength) * (f[name].double().abs() + s[name].double().abs())
        _assert_close(name, published[name], want, scale)


def _one_diff_recipe(family, target: str, weight: float) -> dict:
    return {"target_base": family[target],
            "diffs": [{"source_base": family["base"], "source_finetuned": family["finetuned"], "weight": weight}]}


@pytest.mark.parametrize("origin", ["recipe", "mergekit"])
def test_a_sweep_multiplies_a_one_diff_weight(family, tmp_path, origin):
    """weight 0.3 swept over [1, 2] builds 0.3 and 0.6 (it built 1 and 2), from a recipe and from a mergekit
    task_arithmetic config alike; the published output is the winner's reference."""
    weight, alphas = 0.3, [1.0, 2.0]
    if origin == "recipe":
        target, recipe = "near", load_recipe(_one_diff_recipe(family, "near", weight))
    else:  # mergekit's base_model is the target and every diff's base
        target = "base"
        recipe = recipe_from_mergekit(f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
                                      f"  - model: {family['finetuned']}\n    parameters: {{weight: {weight}}}\n")
    out = str(tmp_path / "out")
    result = run_checked_graft(GraftRequest(recipe, out), Checks(evaluate=SPEC, select="probe_loss"),
                               alphas=alphas, settings=_settings(tmp_path))
    sweep = result.checks["sweep"]
    window = result.checks["evaluation"]["probe"]["window"]
    for candidate in sweep["candidates"]:
        strength = weight * candidate["alpha"]
        want = _reference_score(family, target, strength, window, str(tmp_path / f"ref-{candidate['alpha']}"))
        assert candidate["score"] == pytest.approx(want, rel=1e-4), candidate["alpha"]
    _assert_published(out, family, target, weight * sweep["chosen_alpha"])


def test_weight_zero_reproduces_the_target_for_every_alpha(family, tmp_path):
    out = str(tmp_path / "out")
    recipe = load_recipe(_one_diff_recipe(family, "near", 0.0))
    result = run_checked_graft(GraftRequest(recipe, out), Checks(evaluate=SPEC), alphas=[0.5, 1.0],
                               settings=_settings(tmp_path))
    target_loss = result.checks["evaluation"]["probe"]["target_base"]["loss"]
    assert [c["score"] for c in result.checks["sweep"]["candidates"]] == [pytest.approx(target_loss)] * 2
    published, target = load_dir(out), load_dir(family["near"])
    assert published.keys() == target.keys() and all(torch.equal(published[k], target[k]) for k in target)


def test_a_sweep_multiplies_list_weights_and_rules(family, tmp_path):
    """A recipe with a weight list and a rule: each candidate scales both (the rule's weight replaces the
    diff's for its tensors, and alpha is a strength on both)."""
    data = _one_diff_recipe(family, "near", [0.2, 0.6])
    data["rules"] = [{"match": r"mlp\.", "weight": 0.5}]
    out = str(tmp_path / "out")
    result = run_checked_graft(GraftRequest(load_recipe(data), out), Checks(evaluate=SPEC),
                               alphas=[1.5, 3.0], settings=_settings(tmp_path))
    chosen = result.checks["sweep"]["chosen_alpha"]
    t, s, f = (load_dir(family[r]) for r in ("near", "base", "finetuned"))
    published = load_dir(out)
    for name in t:
        if "mlp." in name:
            w = 0.5
        elif ".layers.0." in name or "embed" in name:
            w = 0.2
        elif ".layers.1." in name:
            w = 0.6
        else:  # graft's own recipes: the final norm and head take the list's last value
            w = 0.6
        want = t[name].double() + w * chosen * (f[name].double() - s[name].double())
        scale = t[name].double().abs() + abs(w * chosen) * (f[name].double().abs() + s[name].double().abs())
        _assert_close(name, published[name], want, scale)


def test_an_overflowing_candidate_is_refused_before_anything_is_read(family, tmp_path):
    out = str(tmp_path / "out")
    request = GraftRequest(load_recipe(_one_diff_recipe(family, "near", 10.0)), out)
    with pytest.raises(GraftError) as err:
        run_checked_graft(request, Checks(evaluate=SPEC), alphas=[1.0, 1e308], settings=_settings(tmp_path))
    assert err.value.code == "invalid_option" and err.value.message.startswith("alpha:")
    assert not os.path.exists(out) and os.listdir(tmp_path / "scratch") == []


def _ties_reference(t, deltas: list[torch.Tensor], weights: list[float], strength: float,
                    elect: float | None = None) -> torch.Tensor:
    """ties (density 1, normalize): v_i = w_i d_i; s = sign(sum v_i), 0 counting as +; v_i joins where it is
    not 0 and has sign s; target + strength * sum(joining v_i) / sum(joining w_i) (1 where none joins).
    `elect`: the sign taken where the election is within float32's resolution of a tie (the engine's deltas are
    float32, so there either sign is right)."""
    v = torch.stack([w * d for w, d in zip(weights, deltas, strict=True)])
    sign = torch.where(v.sum(0) >= 0, 1.0, -1.0).double()
    if elect is not None:
        sign = torch.where(v.sum(0).abs() <= 4 * 2.0 ** -24 * v.abs().sum(0), elect, sign)
    joins = (v != 0) & (torch.sign(v) == sign)
    divisor = (joins * torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * t.dim())).sum(0)
    merged = (v * joins).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    return t + strength * merged


@pytest.mark.parametrize("merge", [{"method": "ties"}, {"method": "sum", "normalize": True}])
def test_alpha_scales_a_normalized_merge(family, tmp_path, merge):
    """Under normalize the merge divides by the weights' sum: alpha times the weights cancelled out, and a
    sweep over a ties recipe built one model several times. Alpha scales the merged delta."""
    t, s = load_dir(family["near"]), load_dir(family["base"])
    fts = [load_dir(family[name]) for name in ("finetuned", "unrelated")]
    weights = [1.0, 0.5]
    data = {"target_base": family["near"], "merge": merge, "diffs": [
        {"source_base": family["base"], "source_finetuned": family[name], "weight": w}
        for name, w in zip(("finetuned", "unrelated"), weights, strict=True)]}
    for alpha in (0.5, 2.0):
        out = str(tmp_path / f"out-{alpha}")
        run_graft(GraftRequest(load_recipe(data).scaled(alpha), out), settings=_settings(tmp_path))
        published = load_dir(out)
        for name, value in published.items():
            deltas = [f[name].double() - s[name].double() for f in fts]
            scale = t[name].double().abs() + 4 * abs(alpha) * sum(d.abs() for d in deltas)
            if merge["method"] == "ties":
                up, down = (_ties_reference(t[name].double(), deltas, weights, alpha, e) for e in (1.0, -1.0))
                bound = ulp(up, value.dtype) + 4 * 2.0 ** -24 * scale
                near = ((value.double() - up).abs() <= bound) | ((value.double() - down).abs() <= bound)
                assert bool(near.all()), name
                continue
            want = t[name].double() + alpha * sum(w * d for w, d in zip(weights, deltas, strict=True)) / 1.5
            _assert_close(name, value, want, scale)


def test_a_normalize_divisor_near_zero_is_not_divided_by(family, tmp_path):
    """Weights summing to within 1e-8 of 0 under normalize: mergekit divides by 1 there, and so does graft (it
    divided by 1e-10, amplifying the deltas ten billion times)."""
    t, s, f = (load_dir(family[r]) for r in ("near", "base", "finetuned"))
    u = load_dir(family["unrelated"])
    weights = [1.0, -0.9999999999]
    data = {"target_base": family["near"], "merge": {"method": "sum", "normalize": True}, "diffs": [
        {"source_base": family["base"], "source_finetuned": family[name], "weight": w}
        for name, w in zip(("finetuned", "unrelated"), weights, strict=True)]}
    out = str(tmp_path / "out")
    run_graft(GraftRequest(load_recipe(data), out), settings=_settings(tmp_path))
    for name, value in load_dir(out).items():
        df, du = f[name].double() - s[name].double(), u[name].double() - s[name].double()
        want = t[name].double() + weights[0] * df + weights[1] * du
        _assert_close(name, value, want, t[name].double().abs() + 2 * (df.abs() + du.abs()))


# --- the API: alpha times weights checked where the recipe is built ------------------------------------------

@pytest.fixture(scope="module")
def api(redis_url, trio, tmp_path_factory):
    """No worker: an accepted job would stay queued and count against the tenant's quota."""
    root = str(tmp_path_factory.mktemp("strength-api"))
    service = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                      GRAFT_TENANT_RATE_PER_MINUTE=0, GRAFT_PREVIEW_WORKERS=1)
    try:
        yield service.start_api()
    finally:
        service.stop()


def _diff(trio, weight) -> dict:
    return {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}",
            "weight": weight}


def _overflowing_bodies(trio) -> list[dict]:
    target = f"file://{trio['target_base']}"
    yaml_config = (f"merge_method: task_arithmetic\nbase_model: {trio['source_base']}\nmodels:\n"
                   f"  - model: {trio['source_finetuned']}\n    parameters: {{weight: 10}}\n")
    return [
        {"target_base": target, "diffs": [_diff(trio, 10)], "options": {"alpha": 1e308}},
        {"target_base": target, "diffs": [_diff(trio, 10), _diff(trio, [1, 2])], "options": {"alpha": 1e308}},
        {"target_base": target, "diffs": [_diff(trio, 10)], "options": {"alpha": [1, 1e308]}, "select": "probe_loss"},
        {"target_base": target, "diffs": [_diff(trio, 1)], "rules": [{"match": "mlp", "weight": 1e30}],
         "options": {"alpha": 1e10}},
        {"target_base": target, "diffs": [_diff(trio, 1), _diff(trio, 1e30)], "merge": {"method": "ties"},
         "options": {"alpha": [1, 1e10]}, "select": "probe_loss"},
        {"mergekit_config": yaml_config, "options": {"alpha": 1e308}},
    ]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs:preview", "/v1/preflights"])
def test_alpha_times_weights_that_overflow_is_422_naming_alpha(api, trio, route):
    with api.client() as c:
        before = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
        for body in _overflowing_bodies(trio):
            if route == "/v1/preflights" and isinstance(body["options"]["alpha"], list):
                continue  # a preflight takes no sweep (refused by name elsewhere)
            resp = c.post(route, json=body)
            assert resp.status_code == 422, (body, resp.text)
            problem = resp.json()
            assert [e["field"] for e in problem["errors"]] == ["options.alpha"], problem
        assert c.get("/v1/jobs", params={"limit": 100}).json()["data"] == before  # nothing accepted


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs:preview"])
@pytest.mark.parametrize("patch, field", [
    ({"diffs": "two", "weights": [1e308, 1e308]}, "diffs.0.weight"),
    ({"diffs": "two", "weights": [1e300, 1.0]}, "diffs.0.weight"),  # past float32 itself: the schema's bound
    ({"diffs": "two", "weights": [1e30, 1.0], "merge": {"method": "ties", "lambda": 1e30}}, "merge.lambda"),
    ({"diffs": "two", "weights": [1e30, 1.0], "merge": {"method": "sum", "lambda": 1e10}}, "merge.lambda"),
    ({"diffs": "two", "weights": [3e38, 3e38], "merge": {"method": "sum", "normalize": True}}, "diffs"),
    # each weight and their sum fine, but normalize divides by a sum of 1e-8: a factor of 1e46
    ({"diffs": "three", "weights": [1e38, -1e38, 1e-8], "merge": {"method": "sum", "normalize": True}}, "diffs"),
    ({"options": {"alpha": 1e308}}, "options.alpha"),
    ({"options": {"alpha": 10**400}}, "options.alpha"),  # an integer past float's range was an OverflowError
    ({"mergekit": "lambda: 1e300, weight: 1e300"}, "mergekit_config"),
])
def test_factors_past_float32_are_refused_where_the_recipe_is_built(api, trio, route, patch, field):
    """Every factor the float32 arithmetic applies (weight x lambda, a normalize divisor, alpha): refused with a
    422 naming its field, where each of these used to be accepted (202) and fail in the worker (internal_error
    or nonfinite_output), or, for the normalized sum, publish the target itself (its scale divided by inf)."""
    target = f"file://{trio['target_base']}"
    if "mergekit" in patch:
        body = {"mergekit_config": f"merge_method: task_arithmetic\nbase_model: {trio['source_base']}\nmodels:\n"
                f"  - model: {trio['source_finetuned']}\n    parameters: {{weight: 1e300}}\n"
                "parameters: {lambda: 1e300}\n"}
    elif "diffs" in patch:
        body = {"target_base": target, "diffs": [_diff(trio, w) for w in patch["weights"]],
                **({"merge": patch["merge"]} if "merge" in patch else {})}
    else:
        body = {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}",
                "target_base": target, **patch}
    with api.client() as c:
        resp = c.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    fields = [e["field"] for e in resp.json()["errors"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), resp.json()


def test_alpha_beside_diffs_scales_the_rules_too(api, trio):
    """What the job record holds: the merged delta times alpha (lambda), the rules' tensors included."""
    body = {"target_base": f"file://{trio['target_base']}", "diffs": [_diff(trio, 0.5)],
            "rules": [{"match": "mlp", "weight": 0.25}], "options": {"alpha": 2.0}}
    with api.client() as c:
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        c.post(f"/v1/jobs/{job_id}/cancel")
    recipe = api.store().get(job_id)["recipe"]
    assert (recipe["merge"]["lambda"], recipe["diffs"][0]["weight"], recipe["rules"][0]["weight"]) == (2.0, 0.5, 0.25)
