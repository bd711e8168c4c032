"""The models' forward passes in a child process (GRAFT_EVAL_ISOLATION=process, the service's default; the
rest of the suite runs them inline, see conftest): the same records as in-process, an address-space limit on
the child, a cancel that stops it at once, and a child that dies (the OOM killer, say) failing the evaluation
with a named error while the caller carries on. Nothing is left running."""

from __future__ import annotations

import os
import resource
import signal

import pytest
from checks_models import PROBE, PROMPTS, checks_family
from hub_server import HubServer
from service_fixtures import descendants_running

from worker.engine import GraftCancelled, GraftError, GraftOptions, GraftRequest
from worker.engine.checks.checked_graft import Checks, run_checked_graft
from worker.engine.checks.evaluation.isolation import MEMORY_SLACK_BYTES
from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.checks.inspect import Level, inspect_graft
from worker.engine.config import EngineSettings

SPEC = EvaluateSpec(probe_text=PROBE, prompts=PROMPTS, max_new_tokens=4)
BUDGET = 1 << 30


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("isolation")))


def _settings(mode: str) -> EngineSettings:
    return EngineSettings(cache_dir="", probe_max_tokens=512, eval_isolation=mode, eval_memory_bytes=BUDGET)


def _request(family, out: str) -> GraftRequest:
    return GraftRequest.single(family["base"], family["finetuned"], family["near"], out, GraftOptions(alpha=0.5))


def _children() -> list[int]:
    """The model children of this process (the tokenizer's children below them count as theirs)."""
    return descendants_running(os.getpid(), b"_model_child")


def _soft_address_limit(pid: int) -> int | None:
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max address space"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    return None


def test_a_child_evaluates_as_the_worker_would_within_its_address_space(family, tmp_path):
    records, limits = {}, []

    def watch() -> bool:  # the cancel check, polled while the child works: read the child's limit meanwhile
        limits.extend(_soft_address_limit(pid) for pid in _children())
        return False

    for mode in ("inline", "process"):
        result = run_checked_graft(_request(family, str(tmp_path / mode)), Checks(evaluate=SPEC),
                                   settings=_settings(mode), should_cancel=watch if mode == "process" else None)
        records[mode] = {k: v for k, v in result.checks["evaluation"].items() if k != "seconds"}
    assert records["process"] == records["inline"]
    limited = [limit for limit in limits if limit is not None]  # set once torch is imported, then for good
    assert limited and limits[-1] is not None, limits
    own_soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    assert own_soft == resource.RLIM_INFINITY  # the caller's own process is not limited
    assert all(BUDGET + MEMORY_SLACK_BYTES < limit < BUDGET + MEMORY_SLACK_BYTES + (16 << 30) for limit in limited)
    assert _children() == []


def test_a_function_level_probe_in_a_child_is_the_inline_one(family):
    request = _request(family, "")
    got = {mode: inspect_graft(request, level=Level.FUNCTION, settings=_settings(mode)).report["function"]
           for mode in ("inline", "process")}
    for report in got.values():
        for part in (report, *report.get("probes", ())):
            part.pop("seconds", None)
    assert got["process"] == got["inline"]
    assert _children() == []


def test_a_cancel_kills_the_child_at_once(family, tmp_path):
    seen = []

    def cancel_once_running() -> bool:
        seen.extend(_children())
        return bool(seen)

    out = str(tmp_path / "out")
    with pytest.raises(GraftCancelled):
        run_checked_graft(_request(family, out), Checks(evaluate=SPEC), settings=_settings("process"),
                          should_cancel=cancel_once_running)
    assert seen and _children() == [] and not os.path.exists(out)


def test_a_child_killed_fails_the_evaluation_by_name_and_the_graft_goes_on(family, tmp_path):
    """SIGKILL, as the OOM killer sends it: the evaluation is recorded as failed (model_too_large, most
    likely memory) and the graft is published all the same; the caller's process is untouched."""
    killed = []

    def kill_the_child() -> bool:
        for pid in _children():
            if not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return False

    out = str(tmp_path / "out")
    result = run_checked_graft(_request(family, out), Checks(evaluate=SPEC), settings=_settings("process"),
                               should_cancel=kill_the_child)
    assert killed
    error = result.checks["evaluation"]["error"]
    assert error["code"] == "model_too_large" and "SIGKILL" in error["message"]
    assert "evaluation_failed" in [w["code"] for w in result.warnings]
    assert os.path.exists(os.path.join(out, "graft-manifest.json")) and _children() == []


def test_hub_inputs_are_read_by_the_child_at_the_commit_grafted(family, tmp_path, monkeypatch):
    """hf:// inputs: the child resolves them again at the commit this process pinned (it was started offline,
    and the hub refused it: every evaluation of a hub graft failed with storage_error)."""
    server = HubServer()
    for name in ("base", "finetuned", "near"):
        server.add(f"t/{name}", family[name])
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        request = GraftRequest.single("hf://t/base", "hf://t/finetuned", "hf://t/near", str(tmp_path / "out"),
                               GraftOptions(alpha=0.5))
        evaluation = run_checked_graft(request, Checks(evaluate=SPEC), settings=_settings("process")).checks[
            "evaluation"]
    finally:
        server.stop()
    assert "error" not in evaluation, evaluation
    local = run_checked_graft(_request(family, str(tmp_path / "local")), Checks(evaluate=SPEC),
                              settings=_settings("inline")).checks["evaluation"]
    assert evaluation["probe"] == local["probe"]


def test_the_child_names_models_by_their_roles(family, tmp_path):
    """No input has a tokenizer: the function level's refusal names target_base (whose files it tried) in the
    child as inline, not the child's own name for the model (tokenizer_from)."""
    import shutil

    bare = {}
    for name in ("base", "near"):
        bare[name] = str(tmp_path / name)
        shutil.copytree(family[name], bare[name], ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    request = GraftRequest.single(bare["base"], family["finetuned_no_tokenizer"], bare["near"], "",
                                  GraftOptions(alpha=0.5))
    said = {}
    for mode in ("inline", "process"):
        with pytest.raises(GraftError) as err:
            inspect_graft(request, level=Level.FUNCTION, settings=_settings(mode))
        said[mode] = (err.value.code, err.value.message)
    assert said["process"] == said["inline"] and said["inline"][1].startswith("target_base:"), said
