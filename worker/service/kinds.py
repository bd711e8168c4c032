"""The table of job kinds: what the work horse runs for each. A new kind (a diff extraction, an adapter export)
is its module with a runner `(request, spec, settings, reporter) -> result` and one row here; the worker's
dispatch reads the table, and the API's schema takes the kinds from JobKind.

Runners are named, not imported: this module stays importable without torch (the API imports the worker's
job module to enqueue), and each runner imports the engine in the job's own process."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from worker.service.settings import Settings
from worker.service.statuses import JobKind


@dataclass(frozen=True)
class Kind:
    name: JobKind
    runner: str  # "module:function"

    def run(self, request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(request, spec, settings, reporter)


KINDS: dict[JobKind, Kind] = {kind.name: kind for kind in (
    Kind(JobKind.GRAFT, "worker.service.graft_job:run_graft_job"),
    Kind(JobKind.PREFLIGHT, "worker.service.preflights:run_preflight"),
)}


def kind_of(record: dict) -> Kind:
    """The kind of a job record (records written before kinds existed are grafts)."""
    return KINDS[JobKind(record.get("kind") or JobKind.GRAFT)]
