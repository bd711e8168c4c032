"""A graft with its checks: `require: compatible` before anything is written, an evaluation of the output
before it is published, and an alpha sweep that publishes only the best candidate.

    require  -> inspect (weights level) -> refuse with incompatible_bases, or go on
    evaluate -> run_graft(before_commit = evaluate the staged output) -> manifest["evaluation"]
    sweep    -> per alpha: build into private scratch, evaluate, keep the best so far
             -> build the winner into the real output (same plan, same bytes: checked) -> manifest["sweep"]

A sweep builds its candidates one after another, each through the same streaming engine (its memory bound)
and the same evaluation (at most about two models in memory): streaming once into several outputs would save
reads but hold every candidate's blocks at once, and score none of them until all were written. The winner is
built again into the real output rather than copied, so that it is published by the one path that publishes
grafts (fences, atomic commit, S3 claims); its shard digests must equal the scored candidate's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError, GraftSuperseded
from worker.engine.pipeline.hooks import Hooks
from worker.engine.planning.options import check_alpha
from worker.engine.planning.request import GraftRequest

if TYPE_CHECKING:
    from worker.engine.pipeline.graft import BeforeCommit, GraftResult, Progress
    from worker.engine.storage.model import ResolvedModel
    from worker.engine.storage.sinks import FileRecord
    from worker.engine.storage.uris import Location

MAX_SWEEP = 8  # candidates: each is a whole graft plus an evaluation
SCRATCH_PREFIX = "graft-sweep-"


class Select(StrEnum):
    """What picks a sweep's winner (lowest wins)."""

    PROBE_LOSS = "probe_loss"  # the output's mean loss on the probe text
    KL_TO_FINETUNED = "kl_to_finetuned"  # KL(fine-tune || output) of next-token distributions on the prompts


class Require(StrEnum):
    COMPATIBLE = "compatible"


class Checks(BaseModel):
    """What a graft job may ask beyond the graft: the one declaration the API body and the CLI flags share."""

    model_config = ConfigDict(extra="forbid")
    evaluate: EvaluateSpec | None = Field(None, description="after the graft, before it is published: loss and "
                                          "perplexity on a probe text, KL to the fine-tune and a greedy sample "
                                          "per prompt, recorded as `evaluation`")
    select: Select | None = Field(None, description="with a list of alphas (a sweep): the score that picks the "
                                  "one candidate published (lowest wins); default probe_loss")
    require: Require | None = Field(None, description="`compatible`: inspect the inputs (weights level) first and "
                                    "fail with incompatible_bases, writing nothing, unless the verdict is compatible")


def check_alphas(alphas: list[float]) -> list[float]:
    if not 2 <= len(alphas) <= MAX_SWEEP:
        raise GraftError("invalid_option", f"alpha: a sweep takes 2 to {MAX_SWEEP} values")
    values = [check_alpha(a) for a in alphas]
    if len(set(values)) != len(values):
        raise GraftError("invalid_option", "alpha: the values must differ")
    return values


def with_alpha(request: GraftRequest, alpha: float, **changes) -> GraftRequest:
    """The request at strength alpha: its recipe's merged delta times alpha (Recipe.scaled). Always a product:
    a one-diff recipe with weight w is the plain transfer at alpha w, and a sweep over it builds w * alpha
    (GraftError naming alpha when a product leaves float32's range)."""
    return dataclasses.replace(request, recipe=request.recipe.scaled(alpha), **changes)


def run_checked_graft(request: GraftRequest, checks: Checks | None = None, *, alphas: list[float] | None = None,
                      settings: EngineSettings | None = None, progress: Callable[[Progress], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      warn: Callable[[dict], None] | None = None) -> GraftResult:
    """A graft with what `checks` asks; `alphas`: a sweep, each value a strength that multiplies the request's
    own alpha or its recipe's weights."""
    from worker.engine.pipeline.graft import run_graft

    checks = checks or Checks()
    if alphas:
        alphas = check_alphas(alphas)
        for alpha in alphas:  # every candidate's weights are finite, or nothing is read
            with_alpha(request, alpha)
    hooks = Hooks(settings or EngineSettings(), progress or (lambda p: None), should_cancel,
                   warn or (lambda w: None))
    sections: dict = {}
    if checks.require is not None:
        sections["preflight"] = require_compatible(request, hooks)
    if alphas:
        return _sweep(request, alphas, checks, hooks, sections)
    evaluate = _evaluator(checks.evaluate, request, hooks) if checks.evaluate is not None else None

    def before_commit(staged: Location, models: dict[str, ResolvedModel], shards: list[FileRecord]) -> dict:
        return {**sections, **(evaluate(staged, models, shards) if evaluate is not None else {})}

    return run_graft(request, settings=hooks.settings, progress=hooks.progress, should_cancel=should_cancel,
                     warn=hooks.warn, before_commit=before_commit if sections or evaluate else None)


def require_compatible(request: GraftRequest, hooks: Hooks) -> dict:
    """The weights-level verdict, or incompatible_bases before anything is written."""
    from worker.engine.checks.inspect import Level, Verdict, inspect_graft

    result = inspect_graft(request, level=Level.WEIGHTS, settings=hooks.settings, should_cancel=hooks.should_cancel,
                           progress=_not_committing(hooks.progress))
    report = result.report
    summary = {"verdict": report["verdict"], "reasons": report["reasons"], "level": str(Level.WEIGHTS)}
    if report["verdict"] != Verdict.COMPATIBLE:
        why = "; ".join(r["message"] for r in report["reasons"] if r.get("verdict") != Verdict.COMPATIBLE)[:1500]
        raise GraftError("incompatible_bases", f"require: compatible, but the inputs were judged "
                         f"{report['verdict']}: {why or 'see the report'}", {"preflight": summary})
    return summary


def _evaluator(spec: EvaluateSpec, request: GraftRequest, hooks: Hooks, *, required: bool = False
               ) -> BeforeCommit:
    """before_commit: the staged output (resolved like any input, under the request's confinement) evaluated
    against the target base and the (first) fine-tune. An evaluation that cannot run (no tokenizer, a model
    too large for this worker, out of time) is recorded as such and the graft is published all the same,
    unless `required` (a sweep cannot pick without scores)."""
    from worker.engine.checks.evaluation import isolation
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import pick_device, remote_reads
    from worker.engine.storage.model import resolve_model

    def evaluate(staged: Location, models: dict[str, ResolvedModel], shards: list[FileRecord]) -> dict:
        settings = hooks.settings
        output = resolve_model("output", staged, endpoint_url=settings.s3_endpoint_url,
                               max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                               allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                               retry=storage_retry(settings))
        finetuned = None
        try:
            finetuned = _real_finetuned(models["source_finetuned"], request, settings)
            evaluation = isolation.evaluate(output, models["target_base"], finetuned or models["source_finetuned"],
                                            spec, settings=settings, device=str(pick_device(request.options.device)),
                                            should_cancel=hooks.should_cancel,
                                            roots=(request.allowed_roots, request.denied_roots))
        except GraftError as err:
            if required or isinstance(err, GraftCancelled | GraftSuperseded):  # a cancel, the fence: never advice
                raise
            return {"evaluation": {"error": {"code": err.code, "message": err.message}},
                    "warnings": [{"code": "evaluation_failed", "message": f"the output was not evaluated: "
                                  f"[{err.code}] {err.message}"}]}
        finally:
            output.store.close()
            if finetuned is not None:
                finetuned.store.close()
        warnings = evaluation_warnings(evaluation)
        return {"evaluation": evaluation, **({"warnings": warnings} if warnings else {})}

    return evaluate


def recorded_finetuned_uri(key: str, request: GraftRequest, settings) -> str:
    """The fine-tune a diff artifact was extracted from (its manifest's record), for the input key a diff
    artifact stands in for; a model's URI as it is. An evaluation compares the output with the fine-tune
    itself, which the artifact does not hold."""
    from worker.engine.planning.recipe import split_artifact_input

    artifact = split_artifact_input(key)
    if artifact is None:
        return key
    from worker.engine.diffs.artifact import read_manifest
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.storage.stores import open_store
    from worker.engine.storage.uris import parse_uri

    store = open_store(parse_uri(artifact[0], field="diff"), settings.s3_endpoint_url, retry=storage_retry(settings),
                       allowed_roots=request.allowed_roots, denied_roots=request.denied_roots)
    try:
        return read_manifest(store, artifact[0]).sources["source_finetuned"].uri
    finally:
        store.close()


def _real_finetuned(model: ResolvedModel, request: GraftRequest, settings) -> ResolvedModel | None:
    """For a diff artifact's stand-in, the fine-tune it was extracted from (diffs/artifact.recorded_model)."""
    from worker.engine.diffs.artifact import recorded_model
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import remote_reads

    return recorded_model(model, "source_finetuned", endpoint_url=settings.s3_endpoint_url,
                          max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                          allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                          retry=storage_retry(settings))


def evaluation_warnings(evaluation: dict) -> list[dict]:
    """What an evaluation says the job's warnings must carry: how it adapted (prompts skipped or shortened on a
    short context, a probe text the tokenizer could not read) and its quality warning."""
    warnings = [w for w in evaluation.get("warnings") or () if isinstance(w, dict)]
    if evaluation.get("quality_warning"):
        warnings.append(evaluation["quality_warning"])
    return warnings


def _score(evaluation: dict, select: Select) -> float:
    """Lower is better; a score that is not a number (an output whose loss overflowed) ranks last."""
    if select == Select.KL_TO_FINETUNED:
        value = evaluation["kl_to_finetuned"]["mean"]
    else:
        value = evaluation["probe"]["output"]["loss"]
    value = float("nan") if value is None else float(value)
    return value if math.isfinite(value) else math.inf


@dataclasses.dataclass
class _Candidate:
    alpha: float
    score: float
    evaluation: dict
    warnings: list[dict]
    digests: dict[str, str]
    directory: str


def _sweep(request: GraftRequest, alphas: list[float], checks: Checks, hooks: Hooks, sections: dict
           ) -> GraftResult:
    from worker.engine.pipeline.graft import run_graft

    select = checks.select or Select.PROBE_LOSS
    spec = checks.evaluate or EvaluateSpec()
    _check_scorable(request, spec, select, hooks)
    scratch = sweep_scratch(hooks.settings)
    scores: list[dict] = []
    best: _Candidate | None = None
    try:
        for index, alpha in enumerate(alphas):
            candidate = _build_candidate(request, alpha, index, scratch, spec, select, hooks)
            _check_measured(candidate, select)
            scores.append({"alpha": alpha, "score": candidate.score, "evaluation": candidate.evaluation})
            if best is None or candidate.score < best.score:  # ties keep the earlier (listed first) alpha
                candidate, best = best, candidate
            if candidate is not None:
                shutil.rmtree(candidate.directory, ignore_errors=True)  # losers are not left behind
        assert best is not None
        if best.score == math.inf:
            raise GraftError("sweep_unscored", f"no candidate of the sweep could be scored by {select} (every "
                             "score was NaN or infinite)", {"candidates": scores})
        sweep = {"select": str(select), "chosen_alpha": best.alpha, "candidates": scores,
                 "built": "one after another; the winner built again into the output"}

        def before_commit(staged: Location, models: dict[str, ResolvedModel], shards: list[FileRecord]) -> dict:
            # Checked before the manifest: a mismatch publishes nothing.
            if {f.path: f.sha256 for f in shards if f.path in best.digests} != best.digests:
                raise GraftError("internal_error", "the output differs from the candidate that was scored")
            return {**sections, "sweep": sweep, "evaluation": best.evaluation, "warnings": best.warnings}

        return run_graft(with_alpha(request, best.alpha), settings=hooks.settings, progress=hooks.progress,
                         should_cancel=hooks.should_cancel, warn=hooks.warn, before_commit=before_commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_scorable(request: GraftRequest, spec: EvaluateSpec, select: Select, hooks: Hooks) -> None:
    """Before any candidate is built: prompts the evaluations would refuse (the user's past the models'
    context) or that cannot measure the selection (no built-in prompt fits a context, select
    kl_to_finetuned) fail the sweep now, not after candidates that could never be scored. Reads the target
    base's and the fine-tune's headers and runs the fine-tune's tokenizer; nothing when neither applies."""
    if spec.prompts is None and select != Select.KL_TO_FINETUNED:
        return  # the built-in prompts adapt, and the probe loss needs none of them
    from worker.engine.checks.evaluation.evaluate import check_prompts_fit
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import remote_reads
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    settings = hooks.settings
    models: list[ResolvedModel] = []
    try:
        finetuned = recorded_finetuned_uri(request.source_finetuned, request, settings)
        for role, uri in (("target_base", request.target_base), ("source_finetuned", finetuned)):
            models.append(resolve_model(role, parse_uri(uri, field=role), endpoint_url=settings.s3_endpoint_url,
                                        max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                                        allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                                        retry=storage_retry(settings)))
        check_prompts_fit(models[0], models[1], spec, settings=settings,
                          need_kl=select == Select.KL_TO_FINETUNED, should_cancel=hooks.should_cancel)
    finally:
        for model in models:
            model.store.close()


def _check_measured(candidate: _Candidate, select: Select) -> None:
    """A selection by KL that the first candidate's evaluation could not measure (every built-in prompt
    skipped: the memory bound left a window shorter than the context _check_scorable saw) fails at once:
    no later candidate would be measured either."""
    if select != Select.KL_TO_FINETUNED or candidate.evaluation["kl_to_finetuned"]["mean"] is not None:
        return
    from worker.engine.checks.evaluation.evaluate import no_prompt_fits

    record = candidate.evaluation.get("prompts") or {}
    skipped = [s["tokens"] for s in record.get("skipped") or ()]
    raise no_prompt_fits(int(record.get("window") or 0), skipped or [0],
                         limit="the window the models' context and memory bound (GRAFT_EVAL_MEMORY_BYTES) leave")


def sweep_scratch(settings: EngineSettings, prefix: str = SCRATCH_PREFIX) -> str:
    """A private directory for a sweep's candidates (an alpha sweep's, a LoRA rank sweep's), owned like a graft's
    temp output: what a killed sweep left (its process gone) is removed by the next one on this host."""
    from worker.engine.storage.sinks import OWNER, remove_orphans

    parent = settings.scratch_dir or tempfile.gettempdir()
    remove_orphans(parent, prefix)
    scratch = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(scratch, OWNER), "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    return scratch


def _build_candidate(request: GraftRequest, alpha: float, index: int, scratch: str, spec: EvaluateSpec,
                     select: Select, hooks: Hooks) -> _Candidate:
    """One candidate built into the private scratch directory and scored. Its progress reads as streaming
    (it is not the job's commit), and its plan warnings are the final graft's: not repeated here."""
    from worker.engine.pipeline.graft import run_graft

    directory = os.path.join(scratch, f"candidate-{index}")
    roots = None if request.allowed_roots is None else [*request.allowed_roots, scratch]
    candidate = with_alpha(request, alpha, output=directory, writer=None, allowed_roots=roots)
    result = run_graft(candidate, settings=hooks.settings, progress=_not_committing(hooks.progress),
                       should_cancel=hooks.should_cancel, warn=lambda w: None,
                       before_commit=_evaluator(spec, candidate, hooks, required=True))
    evaluation = result.checks["evaluation"]
    warnings = evaluation_warnings(evaluation)
    digests = {f.path: f.sha256 for f in result.files if f.path.endswith(".safetensors")}
    return _Candidate(alpha, _score(evaluation, select), evaluation, warnings, digests, directory)


def _not_committing(progress: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """The progress of a pass inside a graft job that is not the job's own commit (a `require` inspection, a
    sweep's candidate): its committing and done phases are not the job's, so they are not reported."""
    from worker.engine.phases import Phase

    def report(p: Progress) -> None:
        if p.phase not in (Phase.COMMITTING, Phase.DONE):
            progress(p)

    return report
