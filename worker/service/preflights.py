"""The preflight job: a compatibility check of a graft's inputs (worker/engine/inspect), its report.json and
chart published under the job's output like a graft's files (manifest last), the report on the job record."""

from __future__ import annotations

import json
import time

from worker.service.settings import Settings

# The per-tensor table stays in report.json: a job record is returned on every poll.
_RECORD_DROPS = ("tensors",)


def run_preflight(request, spec: dict, settings: Settings, reporter) -> dict:
    from worker.engine.checks.inspect import Level, inspect_graft
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
