"""What a job kind is: the parts its module declares, read once when the kind is registered.

A kind's module holds
- `NAME`: the kind as job records name it;
- `Body`: its request body, a pydantic model extending `bodies.Models` (every kind takes the models);
- `ROUTE`: how the API offers it (`Route`);
- `spec(body) -> dict | None`: what the worker needs of the body beyond the recipe (stored with the record,
  never shown; None: nothing);
- `run(request, spec, settings, reporter) -> dict`: the runner, in the job's process, publishing what it writes
  through worker/engine/pipeline/publish.py `publishing`; it returns the record's result (uri, manifest_uri,
  files and stats, as the API's Result states them, and keys of its own) and imports the engine's heavy parts
  (torch) inside itself, because the API imports the module for its body;
- optionally `check(body)`: what the schema cannot say, raised as `bodies.BodyError`;
- optionally `shown(spec) -> dict | None`: the spec as a job shows it (default: as it is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from worker.service.kinds.bodies import Models
from worker.service.settings import Settings

Runner = Callable[[Any, dict, Settings, Any], dict]  # (request, spec, settings, reporter) -> the record's result


@dataclass(frozen=True)
class Route:
    """POST /v1{path} submits a job of the kind. `name` is the handler's, the stem of its OpenAPI operationId;
    `responses`: status codes (with their descriptions) beyond those every submitting route answers."""

    path: str
    name: str
    summary: str
    description: str | None = None
    responses: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))


def _nothing(body: Models) -> None:
    return None


def _as_is(spec: dict | None) -> dict | None:
    return spec or None


@dataclass(frozen=True)
class Kind:
    name: str
    body: type[Models]
    route: Route
    spec: Callable[[Models], dict | None]
    runner: Runner
    check: Callable[[Models], None] = _nothing
    shown: Callable[[dict | None], dict | None] = _as_is

    @classmethod
    def of(cls, module: Any) -> Kind:
        """The kind a module (or any object with the same attributes) declares; refused by name when a part
        is missing or of the wrong sort."""
        where = getattr(module, "__name__", repr(module))
        missing = [n for n in ("NAME", "Body", "ROUTE", "spec", "run") if not hasattr(module, n)]
        if missing:
            raise TypeError(f"job kind {where}: missing {', '.join(missing)}")
        if not (isinstance(module.Body, type) and issubclass(module.Body, Models)):
            raise TypeError(f"job kind {where}: Body must extend worker.service.kinds.bodies.Models")
        if not isinstance(module.ROUTE, Route):
            raise TypeError(f"job kind {where}: ROUTE must be a kinds.Route")
        return cls(module.NAME, module.Body, module.ROUTE, module.spec, module.run,
                   getattr(module, "check", _nothing), getattr(module, "shown", _as_is))

    def run(self, request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
        return self.runner(request, spec, settings, reporter)
