"""The graft job: the graft with the checks the job asked for (evaluate, require, an alpha sweep), its result
as the job record holds it."""

from __future__ import annotations

from typing import Any

from worker.service.settings import Settings


def run_graft_job(request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
    from worker.engine.checks.checked_graft import Checks, run_checked_graft  # torch: in the job's process only

    checks = Checks.model_validate({k: v for k, v in spec.items() if k != "alpha"})
    result = run_checked_graft(request, checks, alphas=spec.get("alpha"), settings=settings,
                               progress=reporter.progress, should_cancel=reporter.should_cancel, warn=reporter.warn)
    return {"uri": result.output_uri, "manifest_uri": result.manifest_uri,
            "files": [f.to_dict() for f in result.files], "stats": result.stats, **result.checks}
