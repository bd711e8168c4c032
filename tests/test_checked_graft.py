"""A graft with its checks (worker/engine/checks/checked_graft.py and the CLI): the evaluation recorded is the published
output's (scored again here by transformers in float64), a sweep publishes exactly its best candidate and leaves
no other behind, `require: compatible` refuses before anything is written, and `graft inspect` reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import torch
from checks_models import PROBE, PROMPTS, checks_family
from eval_helpers import encode, reference_loss, reference_model
from graft_helpers import load_dir

from worker.cli import main
from worker.engine import GraftError, GraftOptions, GraftRequest, run_graft
from worker.engine.checks.checked_graft import Checks, run_checked_graft
from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.config import EngineSettings


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("checks")))


def _request(family, target: str, output: str, *, finetuned: str = "finetuned", alpha: float = 1.0) -> GraftRequest:
    return GraftRequest.single(family["base"], family[finetuned], family[target], output, GraftOptions(alpha=alpha))


def _settings(tmp_path) -> EngineSettings:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return EngineSettings(cache_dir="", scratch_dir=str(scratch), probe_max_tokens=512)


SPEC = EvaluateSpec(probe_text=PROBE, prompts=PROMPTS, max_new_tokens=4)


def _manifest(directory: str) -> dict:
    with open(os.path.join(directory, "graft-manifest.json")) as fh:
        return json.load(fh)


def test_evaluation_is_of_the_published_output(family, tmp_path):
    out = str(tmp_path / "out")
    events = []
    result = run_checked_graft(_request(family, "near", out), Checks(evaluate=SPEC), settings=_settings(tmp_path),
                               progress=lambda p: events.append(str(p.phase)))
    evaluation = _manifest(out)["evaluation"]
    assert evaluation == json.loads(json.dumps(result.checks["evaluation"]))
    ids = encode(PROBE)
    window = evaluation["probe"]["window"]
    for role, path in (("output", out), ("target_base", family["near"]), ("source_finetuned", family["finetuned"])):
        ref = reference_loss(reference_model(path), ids, window)
        assert evaluation["probe"][role]["loss"] == pytest.approx(ref, rel=1e-4), role
    assert [s["prompt"] for s in evaluation["samples"]] == PROMPTS
    assert events.index("evaluating") < events.index("committing")  # scored before it was published


def test_no_tokenizer_publishes_the_graft_and_says_why_not_evaluated(family, tmp_path):
    out = str(tmp_path / "out")
    warnings = []
    run_checked_graft(_request(family, "near", out, finetuned="finetuned_no_tokenizer"), Checks(evaluate=SPEC),
                      settings=_settings(tmp_path), warn=warnings.append)
    manifest = _manifest(out)
    assert manifest["evaluation"]["error"]["code"] == "no_tokenizer"
    assert [w["code"] for w in warnings] == ["evaluation_failed"]
    assert "evaluation_failed" in [w["code"] for w in manifest["warnings"]]


def test_sweep_publishes_the_best_candidate_only(family, tmp_path):
    settings = _settings(tmp_path)
    alphas = [0.0, 0.5, 1.0, 4.0]
    out = str(tmp_path / "out")
    result = run_checked_graft(_request(family, "near", out), Checks(evaluate=SPEC), alphas=alphas, settings=settings)
    sweep = _manifest(out)["sweep"]
    # Each candidate built on its own and scored by transformers in float64: the same scores, the same winner.
    ids, window = encode(PROBE), result.checks["evaluation"]["probe"]["window"]
    refs = {}
    for alpha in alphas:
        path = str(tmp_path / f"direct-{alpha}")
        run_graft(_request(family, "near", path, alpha=alpha), settings=settings)
        refs[alpha] = reference_loss(reference_model(path), ids, window)
    assert [c["alpha"] for c in sweep["candidates"]] == alphas
    for c in sweep["candidates"]:
        assert c["score"] == pytest.approx(refs[c["alpha"]], rel=1e-4)
    best = min(alphas, key=lambda a: refs[a])
    assert sweep["chosen_alpha"] == best and result.manifest["options"]["alpha"] == best
    published, direct = load_dir(out), load_dir(str(tmp_path / f"direct-{best}"))
    assert published.keys() == direct.keys()
    assert all(torch.equal(published[k], direct[k]) for k in direct)
    assert os.listdir(settings.scratch_dir) == []  # no candidate left behind
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("direct-")) == ["out", "scratch"]


def _owned_dir(parent, name: str, pid: int) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path)
    with open(os.path.join(path, ".graft-owner"), "w") as fh:
        fh.write(f"{socket.gethostname()} {pid}\n")
    return path


def test_sweep_by_kl_picks_the_finetune_itself(family, tmp_path):
    """Onto its own base, alpha 1 rebuilds the fine-tune: KL 0, the lowest any candidate can score. What a
    killed sweep left in the scratch directory goes; a live sweep's stays."""
    settings = _settings(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = _owned_dir(settings.scratch_dir, "graft-sweep-stale", dead.pid)
    live = _owned_dir(settings.scratch_dir, "graft-sweep-live", os.getpid())
    out = str(tmp_path / "out")
    result = run_checked_graft(_request(family, "base", out), Checks(evaluate=SPEC, select="kl_to_finetuned"),
                               alphas=[0.5, 1.0, 1.5], settings=settings)
    assert not os.path.exists(stale) and os.path.exists(live)
    sweep = result.checks["sweep"]
    assert sweep["chosen_alpha"] == 1.0 and sweep["select"] == "kl_to_finetuned"
    scores = {c["alpha"]: c["score"] for c in sweep["candidates"]}
    assert scores[1.0] == pytest.approx(0.0, abs=1e-6) and min(scores[0.5], scores[1.5]) > 1e-4


def test_sweep_that_cannot_score_fails_and_leaves_nothing(family, tmp_path):
    settings = _settings(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(GraftError) as err:
        run_checked_graft(_request(family, "near", out, finetuned="finetuned_no_tokenizer"), Checks(),
                          alphas=[0.5, 1.0], settings=settings)
    assert err.value.code == "no_tokenizer"
    assert not os.path.exists(out) and os.listdir(settings.scratch_dir) == []


def test_require_compatible_refuses_before_writing(family, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(GraftError) as err:
        run_checked_graft(_request(family, "unrelated", out), Checks(require="compatible"),
                          settings=_settings(tmp_path))
    assert err.value.code == "incompatible_bases"
    assert err.value.details["preflight"]["verdict"] in ("risky", "incompatible")
    assert os.listdir(tmp_path) == ["scratch"]  # not even a temporary directory
    ok = str(tmp_path / "ok")
    result = run_checked_graft(_request(family, "near", ok), Checks(require="compatible"),
                               settings=_settings(tmp_path))
    assert result.manifest["preflight"]["verdict"] == "compatible"
    assert _manifest(ok)["preflight"]["verdict"] == "compatible"


def test_cli_inspect_report_and_exit_status(family, tmp_path, capsys):
    args = ["inspect", "--source-base", family["base"], "--source-finetuned", family["finetuned"]]
    report_dir = str(tmp_path / "report")
    assert main([*args, "--target-base", family["near"], "--json", "--report", report_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "compatible" and report["levels_run"] == ["headers", "weights"]
    with open(os.path.join(report_dir, "report.json")) as fh:
        assert json.load(fh)["verdict"] == "compatible"
    with open(os.path.join(report_dir, "layers.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main([*args, "--target-base", family["unrelated"], "--require", "compatible"]) == 3
    assert "verdict: incompatible" in capsys.readouterr().out


def test_cli_run_sweep_and_flag_errors(family, tmp_path, capsys):
    out = str(tmp_path / "out")
    probe = tmp_path / "probe.txt"
    probe.write_text(PROBE)
    base = ["run", "--source-base", family["base"], "--source-finetuned", family["finetuned"],
            "--target-base", family["base"]]
    assert main([*base, "--output", out, "--alpha", "0.5,1", "--select", "kl_to_finetuned",
                 "--probe-text", str(probe), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "alpha 1: kl_to_finetuned" in printed and "<- published" in printed
    assert _manifest(out)["sweep"]["chosen_alpha"] == 1.0
    assert main([*base, "--output", str(tmp_path / "x"), "--select", "probe_loss"]) == 2
    assert "--select picks among several alphas" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "y"), "--alpha", "1,1"]) == 2
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_cli_inspect_text_when_the_function_level_cannot_run(family, monkeypatch, capsys):
    """Bases whose interpolation is undefined: the text report says so (and the weights verdict stands)."""
    import sys
    import types

    def function_probe(*args, **kwargs):
        raise GraftError("config_mismatch", "the bases' computing configs differ")

    module = types.ModuleType("worker.engine.checks.inspect.function")
    module.function_probe = function_probe
    monkeypatch.setitem(sys.modules, "worker.engine.checks.inspect.function", module)
    assert main(["inspect", "--source-base", family["base"], "--source-finetuned", family["finetuned"],
                 "--target-base", family["unrelated"], "--level", "function"]) == 0
    printed = capsys.readouterr().out
    assert "function level not run: the bases' computing configs differ" in printed
    assert printed.startswith("verdict: incompatible")
    assert main(["inspect", "--source-base", family["base"], "--source-finetuned", family["finetuned"],
                 "--target-base", family["near"], "--alpha", "0.5,1"]) == 2


def test_sweep_over_a_recipe_scales_the_rules_weights_too(family, tmp_path):
    """A recipe with a weighted rule, swept: the published candidate is target + alpha * w * (f - s) with w the
    rule's weight where it matches and the diff's elsewhere (float64 here; float32 arithmetic's error bound)."""

    from worker.engine.planning.recipe import load_recipe

    recipe = load_recipe({"target_base": family["near"], "rules": [{"match": "mlp", "weight": 0.25}],
                          "diffs": [{"source_base": family["base"], "source_finetuned": family["finetuned"],
                                     "weight": 1.5}]})
    out = str(tmp_path / "out")
    request = GraftRequest(recipe, out)
    assert request.recipe is not None  # not the plain transfer: the rule goes through the recipe path
    result = run_checked_graft(request, Checks(evaluate=SPEC), alphas=[0.5, 2.0], settings=_settings(tmp_path))
    alpha = result.checks["sweep"]["chosen_alpha"]
    published = load_dir(out)
    t, s, f = load_dir(family["near"]), load_dir(family["base"]), load_dir(family["finetuned"])
    for name, value in published.items():
        weight = 0.25 if "mlp" in name else 1.5
        scaled = alpha * weight * (f[name].double() - s[name].double())
        ref = t[name].double() + scaled
        bound = 4 * torch.finfo(value.dtype).eps * (t[name].double().abs() + scaled.abs())
        assert bool(((value.double() - ref).abs() <= bound).all()), name
        other = t[name].double() + alpha * (1.5 if weight == 0.25 else 0.25) * (f[name].double() - s[name].double())
        assert not torch.allclose(value.double(), other), name  # the weights differ where the rule matches
    assert any("mlp" in n for n in published) and any("mlp" not in n for n in published)


def test_a_winner_unlike_its_scored_candidate_is_not_published(family, tmp_path, monkeypatch):
    """The published shards must be the scored candidate's bytes, checked before the manifest is written."""
    import worker.engine.checks.checked_graft as checked

    build = checked._build_candidate

    def tampered(*args, **kwargs):
        candidate = build(*args, **kwargs)
        candidate.digests = {path: "0" * 64 for path in candidate.digests}
        return candidate

    monkeypatch.setattr(checked, "_build_candidate", tampered)
    out = str(tmp_path / "out")
    with pytest.raises(GraftError) as err:
        run_checked_graft(_request(family, "near", out), Checks(evaluate=SPEC), alphas=[0.5, 1.0],
                          settings=_settings(tmp_path))
    assert err.value.code == "internal_error"
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["scratch"]


def test_evaluation_and_sweep_with_an_s3_output(family, tmp_path, s3_endpoint, s3_bucket):
    """The staged output read back from S3 before its manifest: the evaluation is of what was uploaded, and a
    sweep's winner lands there alone."""
    from service_fixtures import read_s3

    settings = _settings(tmp_path).model_copy(update={"s3_endpoint_url": s3_endpoint})
    local = str(tmp_path / "local")
    expected = run_checked_graft(_request(family, "near", local), Checks(evaluate=SPEC), settings=settings)
    uri = f"s3://{s3_bucket}/evaluated"
    result = run_checked_graft(_request(family, "near", uri), Checks(evaluate=SPEC), settings=settings)
    assert result.checks["evaluation"]["probe"] == expected.checks["evaluation"]["probe"]
    swept = f"s3://{s3_bucket}/swept"
    result = run_checked_graft(_request(family, "base", swept), Checks(evaluate=SPEC, select="kl_to_finetuned"),
                               alphas=[0.5, 1.0], settings=settings)
    files = read_s3(s3_endpoint, swept)
    assert result.checks["sweep"]["chosen_alpha"] == 1.0 and "graft-manifest.json" in files
    assert json.loads(files["graft-manifest.json"])["sweep"]["chosen_alpha"] == 1.0
    assert os.listdir(settings.scratch_dir) == []
