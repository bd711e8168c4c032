"""The table of job kinds. A kind (a graft, a preflight, a diff extraction, a LoRA export) is one module
of this package (its body, route, spec and runner: see kind.py) and one registration line below. The API
registers one POST route per kind from the table (app/routes_jobs.py), its OpenAPI follows from the routes, the
worker's dispatch runs `kind_of(record).run(...)` (worker/service/jobs.py) and `graft worker` names the kinds
it runs.

The table is importable without torch: the API imports it for the bodies, and each runner imports the engine's
heavy parts in the job's own process."""

from __future__ import annotations

from typing import Any

from worker.engine.errors import GraftError
from worker.service.kinds import diff_extract, graft, lora_export, preflight
from worker.service.kinds.kind import Kind, Route

__all__ = ["DEFAULT", "KINDS", "Kind", "Route", "kind_of", "register"]

KINDS: dict[str, Kind] = {}
# The kind of a record written before kinds existed.
DEFAULT = graft.NAME


def register(module: Any) -> Kind:
    """Add the kind a module declares; a second kind of the same name or route is refused."""
    kind = Kind.of(module)
    for other in KINDS.values():
        if kind.name == other.name or kind.route.path == other.route.path or kind.route.name == other.route.name:
            raise ValueError(f"job kind {kind.name!r} ({kind.route.path}) collides with {other.name!r} "
                             f"({other.route.path})")
    KINDS[kind.name] = kind
    return kind


def kind_of(record: dict) -> Kind:
    """The kind of a job record; one this process does not know (a record written by a newer API during a
    rolling deploy) fails the job by name."""
    name = record.get("kind") or DEFAULT
    try:
        return KINDS[name]
    except KeyError:
        raise GraftError("unknown_kind", f"this worker runs no job of kind {name!r} (it runs "
                         f"{', '.join(KINDS)})") from None


register(graft)
register(preflight)
register(diff_extract)
register(lora_export)
