"""The compatibility verdict against what grafts actually do, on a tiny family trained in the session
(examples/calibration/family.py, "test" size): v1; v2, its near continuation; v2_far, v1 trained further on
shifted data at a ten times larger rate; an unrelated base (another seed, same data); ft, v1 fine-tuned on
a chat-format question task. Each target is grafted (target + ft - v1) and the output's task score is
measured here, so "the graft recovers the task" is an observation, not an assumption.

The verdict must separate v2 (compatible) from the unrelated base (incompatible), and must never call
`compatible` a target onto which the graft fails to recover the task.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from graft_helpers import graft, load_dir
from tiny_family import family, tiny_family  # noqa: F401  (tiny_family: a session fixture)

from worker.engine import GraftRequest
from worker.engine.checks.inspect import inspect_graft
from worker.engine.config import EngineSettings

TARGETS = ("v1", "v2", "v2_far", "unrelated")
# Every question (20 held out, 40 the fine-tune saw): on so small a model the 20 held-out ones alone move
# by 0.05 a question; the example reports both.
SPLIT = "all"
# A graft "recovers the task" when it keeps at least this share of what fine-tuning gained over v1.
RECOVERED = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run no faster on two threads, and two threads on a busy two-core machine run
    several times slower (the function probe went from 0.3 s to 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _score(directory: str) -> float:
    return family().task_score(directory, SPLIT)


@pytest.fixture(scope="module")
def outcomes(tiny_family, tmp_path_factory) -> dict:  # noqa: F811
    """Task scores: ft, v1, and per target alone and grafted; `recovered` = (grafted - alone) / (ft - v1)."""
    ft, v1 = _score(tiny_family["ft"]), _score(tiny_family["v1"])
    targets = {}
    for name in TARGETS:
        out = tmp_path_factory.mktemp(f"graft-{name}") / "out"
        graft({"source_base": tiny_family["v1"], "source_finetuned": tiny_family["ft"],
               "target_base": tiny_family[name]}, str(out))
        alone, grafted = _score(tiny_family[name]), _score(str(out))
        targets[name] = {"alone": alone, "grafted": grafted, "recovered": (grafted - alone) / (ft - v1)}
    return {"ft": ft, "v1": v1, "targets": targets}


@pytest.fixture(scope="module")
def reports(tiny_family) -> dict[tuple[str, str], dict]:  # noqa: F811
    """(target, level) -> inspect_graft's report, probed on corpus text (the built-in English probe is all
    unknown words to this vocabulary)."""
    text = family().probe_text()
    out = {}
    for name in TARGETS:
        request = GraftRequest.single(tiny_family["v1"], tiny_family["ft"], tiny_family[name], "")
        for level in ("weights", "function"):
            out[name, level] = inspect_graft(request, level=level, settings=EngineSettings(),
                                             probe_text=text).report
    return out


def test_the_family_is_what_the_calibration_needs(outcomes):
    """Without these the verdict tests below would prove nothing: the fine-tune learned the task and v1 did
    not; grafting onto v1 gives the fine-tune back; the near continuation takes the graft and the unrelated
    base does not."""
    t = outcomes["targets"]
    assert outcomes["ft"] >= 0.5 and outcomes["v1"] <= 0.2, outcomes
    assert t["v1"]["grafted"] == outcomes["ft"], outcomes  # v1 + (ft - v1) is ft up to rounding
    assert t["v2"]["recovered"] >= 0.7, outcomes
    assert t["unrelated"]["recovered"] <= 0.2, outcomes


def test_the_fine_tunes_chat_template_renders_the_task_prompts(tiny_family):  # noqa: F811
    """The evaluation renders prompts through the fine-tune's chat template: it must give the token ids the
    task is trained and scored on."""
    from transformers import AutoTokenizer

    fam = family()
    tokenizer = AutoTokenizer.from_pretrained(tiny_family["ft"])
    for question, _answer in fam.task_examples("heldout")[:3]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        assert text == fam.chat_prompt(question)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == fam.encode(text)


def _reference_medians(paths: dict[str, str], target: str) -> dict[str, float]:
    """Medians over the weight matrices of ||t - s|| / ||t|| and cos(t - s, f - s), in float64 from the
    files (the report's definition: matrices whose target and delta are non-zero)."""
    s, f, t = (load_dir(paths[name]) for name in ("v1", "ft", target))
    ratios, cosines = [], []
    for name, tt in t.items():
        if tt.dim() < 2:
            continue
        tt, ss, ff = tt.double(), s[name].double(), f[name].double()
        bases, delta = (tt - ss).flatten(), (ff - ss).flatten()
        if not (float(tt.norm()) and float(delta.norm())):
            continue
        ratios.append(float(bases.norm() / tt.norm()))
        if float(bases.norm()):
            cosines.append(float(torch.dot(bases, delta) / (bases.norm() * delta.norm())))
    return {"bases_distance_ratio": statistics.median(ratios),
            "cos_bases_delta": statistics.median(cosines) if cosines else None}


@pytest.mark.parametrize("target", ["v2", "v2_far", "unrelated"])
def test_weights_figures_on_trained_models_match_float64(reports, tiny_family, target):  # noqa: F811
    medians = reports[target, "weights"]["weights"]["diffs"][0]["medians"]
    for name, want in _reference_medians(tiny_family, target).items():
        # The report's dots are float32 chunks summed in float64: their error is relative to ||t - s|| ||d||, i.e.
        # absolute in a cosine (v2_far's median cosine is 0.0026: 1e-6 of it is below a float32 dot's rounding).
        assert math.isclose(medians[name], want, rel_tol=1e-6, abs_tol=1e-7), (name, medians[name], want)


@pytest.mark.parametrize("level", ["weights", "function"])
def test_verdict_separates_the_near_continuation_from_the_unrelated_base(reports, level):
    assert reports["v1", level]["verdict"] == "compatible", reports["v1", level]["reasons"]
    assert reports["v2", level]["verdict"] == "compatible", reports["v2", level]["reasons"]
    assert reports["unrelated", level]["verdict"] == "incompatible", reports["unrelated", level]["reasons"]


def _failed(outcomes) -> list[str]:
    return [name for name, o in outcomes["targets"].items() if o["recovered"] < RECOVERED]


def test_weights_level_never_calls_a_failed_graft_compatible(reports, outcomes):
    failed = _failed(outcomes)
    assert "unrelated" in failed and "v2_far" in failed, outcomes  # the family gives the check something
    for name in failed:
        assert reports[name, "weights"]["verdict"] != "compatible", (name, outcomes, reports[name, "weights"])


def test_function_level_never_calls_a_failed_graft_compatible(reports, outcomes):
    for name in _failed(outcomes):
        assert reports[name, "function"]["verdict"] != "compatible", (name, outcomes, reports[name, "function"])


@pytest.fixture(scope="module")
def artifact(tiny_family, tmp_path_factory) -> str:  # noqa: F811
    """The fine-tune's diff, extracted once (exact): judged against each target without v1."""
    from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
    from worker.engine.pipeline.diff_extract import extract_diff

    out = str(tmp_path_factory.mktemp("artifact") / "diff")
    extract_diff(DiffExtractRequest(DiffExtract(source_base=tiny_family["v1"], source_finetuned=tiny_family["ft"]),
                                    out), EngineSettings())
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_the_artifacts_sketch_judges_as_the_three_model_inspection(reports, artifact, tiny_family, target):  # noqa: F811
    """The weights level from the target and the artifact alone: every estimated figure within its stated
    bound of the three-model inspection's exact one (a tensor small enough to be stored whole is exact), the
    same verdict."""
    from worker.engine.planning.options import GraftOptions
    from worker.engine.planning.recipe import Recipe

    recipe = Recipe.single("", "", tiny_family[target], GraftOptions(), diff=artifact)
    report = inspect_graft(GraftRequest(recipe, ""), level="weights", settings=EngineSettings()).report
    three = reports[target, "weights"]
    assert report["verdict"] == three["verdict"]
    assert {r["code"] for r in report["reasons"]} == {r["code"] for r in three["reasons"]}
    exact = {t["name"]: t for t in three["weights"]["diffs"][0]["tensors"]}
    from worker.engine.diffs.sketch import BUCKETS

    for t in report["weights"]["diffs"][0]["tensors"]:
        ref = exact[t["name"]]
        assert t["delta_norm"] == pytest.approx(ref["delta_norm"], rel=1e-5)
        assert t["target_norm"] == pytest.approx(ref["target_norm"], rel=1e-6)
        # The three-model figures are float32 dots summed in float64 (tensor_stats.py): 1e-6 of slack for them.
        lo, hi = t["estimated"]["bases_norm"]
        assert lo * (1 - 1e-6) <= ref["bases_norm"] <= hi * (1 + 1e-6), t["name"]
        if ref["cos_bases_delta"] is not None:
            lo, hi = t["estimated"]["cross"]
            cross = ref["cos_bases_delta"] * ref["bases_norm"] * ref["delta_norm"]
            slack = 1e-6 * ref["bases_norm"] * ref["delta_norm"]
            assert lo - slack <= cross <= hi + slack, t["name"]
        if t["elements"] <= BUCKETS:  # stored whole: exact
            assert t["bases_norm"] == pytest.approx(ref["bases_norm"], rel=1e-6, abs=1e-9)
    assert any(t["elements"] > BUCKETS for t in report["weights"]["diffs"][0]["tensors"])
