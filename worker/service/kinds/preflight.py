"""The preflight kind: a compatibility check of a graft's inputs (worker/engine/checks/inspect), submitted at
POST /v1/preflights; its report.json and chart published under the job's output like a graft's files
(manifest last), the report on the job record."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ConfigDict, Field

from worker.engine.checks.evaluation.spec import ProbeText
from worker.engine.verdict import LEVEL_HELP, Level
from worker.service.kinds.bodies import BodyError, Models, either_diffs_or_three_fields, probe_text_by_length
from worker.service.kinds.kind import Route
from worker.service.settings import Settings

NAME = "preflight"
ROUTE = Route("/preflights", "preflight", "Check a graft's inputs before grafting",
              "A job of its own kind, run by the workers and polled at /v1/jobs/{id}: a verdict (compatible, risky, "
              "incompatible) with its reasons and numbers in `result.report`, report.json and a per-layer chart "
              "written under the output. The synchronous header-only plan stays in POST /v1/jobs:preview.")
# The per-tensor table stays in report.json: a job record is returned on every poll.
_RECORD_DROPS = ("tensors",)


class PreflightCreate(Models):
    """A compatibility check of a graft's inputs, run by the workers as a job of its own kind. With several
    diffs, each is judged against the target and the verdict is the worst."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=either_diffs_or_three_fields)
    level: Level = Field(Level.WEIGHTS, description=LEVEL_HELP)
    probe_text: ProbeText | None = Field(None, description="the function level's probe text (at most 64 KiB of "
                                         "UTF-8; default: one built into graft)")


Body = PreflightCreate


def check(body: PreflightCreate) -> None:
    if isinstance(body.options.alpha, list):
        raise BodyError("options.alpha", "a list of alphas is a sweep, which graft jobs run; a preflight judges "
                        "the inputs", "invalid_option")


def spec(body: PreflightCreate) -> dict:
    return {"preflight": body.model_dump(mode="json", include={"level", "probe_text"}, exclude_none=True)}


def shown(asked: dict | None) -> dict | None:
    return probe_text_by_length(asked, "preflight")


def run(request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
    from worker.engine.checks.inspect import inspect_graft  # torch: in the job's process only
    from worker.engine.pipeline.publish import publishing
    from worker.engine.storage.uris import parse_uri

    asked = spec.get("preflight") or {}
    t0 = time.monotonic()
    output = parse_uri(request.output, field="output")
    # The output is claimed first, as a graft's is: an occupied location (output_exists) fails the job before
    # the inspection's pass over the inputs, not after it.
    with publishing(output, request, settings, reporter.should_cancel) as sink:
        result = inspect_graft(request, level=Level(asked.get("level", Level.WEIGHTS)), settings=settings,
                               probe_text=asked.get("probe_text"), should_cancel=reporter.should_cancel,
                               progress=reporter.progress)
        records = [sink.put(name, data) for name, data in sorted(result.artifacts.items())]
        manifest = {"format": "graft-preflight/1", "verdict": result.report["verdict"],
                    "files": [r.to_dict() for r in records]}
        manifest_uri = sink.commit((json.dumps(manifest, indent=2) + "\n").encode())
    chart = next((r.path for r in records if r.path.endswith(".png")), None)
    weights = result.report.get("weights") or {}
    return {"uri": str(output), "manifest_uri": manifest_uri, "files": [r.to_dict() for r in records],
            "stats": {"seconds_total": round(time.monotonic() - t0, 3), "bytes_read": weights.get("bytes_read", 0),
                      "bytes_written": sum(r.size for r in records), "tensors": 0},
            "report": compact(result.report), "chart_uri": str(output.child(chart)) if chart else None}


def compact(report: dict) -> dict:
    """The report without its per-tensor tables (which report.json keeps)."""
    def strip(section):
        if isinstance(section, dict):
            return {k: (f"{len(v)} entries: see report.json" if k in _RECORD_DROPS and isinstance(v, dict | list)
                        else strip(v)) for k, v in section.items()}
        if isinstance(section, list):
            return [strip(v) for v in section]
        return section

    return {**report, **{k: strip(v) for k, v in report.items() if k in ("weights", "headers")}}
