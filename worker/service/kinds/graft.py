"""The graft kind: the graft with the checks the job asked for (evaluate, require, an alpha sweep), submitted
at POST /v1/jobs, its result as the job record holds it."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict

from worker.engine.checks.checked_graft import Checks
from worker.service.kinds.bodies import BodyError, Models, either_diffs_or_three_fields, probe_text_by_length
from worker.service.kinds.kind import Route
from worker.service.settings import Settings

NAME = "graft"
ROUTE = Route("/jobs", "job", "Submit a graft job")


class JobCreate(Models, Checks):
    """A graft job: the models and, optionally, its checks (evaluate, select with a list of alphas, require)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=either_diffs_or_three_fields)


Body = JobCreate


def check(body: JobCreate) -> None:
    if body.select is not None and not isinstance(body.options.alpha, list):
        raise BodyError("select", "picks among several alphas: give options.alpha as a list", "invalid_option")


def spec(body: JobCreate) -> dict | None:
    """What the worker needs of the body's checks (None: a plain graft)."""
    checks = body.model_dump(mode="json", include={"evaluate", "select", "require"}, exclude_none=True)
    if isinstance(body.options.alpha, list):
        checks["alpha"] = body.options.alpha
    return checks or None


def shown(checks: dict | None) -> dict | None:
    return probe_text_by_length(checks, "evaluate")


def run(request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
    from worker.engine.checks.checked_graft import run_checked_graft  # torch: in the job's process only

    checks = Checks.model_validate({k: v for k, v in spec.items() if k != "alpha"})
    result = run_checked_graft(request, checks, alphas=spec.get("alpha"), settings=settings,
                               progress=reporter.progress, should_cancel=reporter.should_cancel, warn=reporter.warn)
    return {"uri": result.output_uri, "manifest_uri": result.manifest_uri,
            "files": [f.to_dict() for f in result.files], "stats": result.stats, **result.checks}
