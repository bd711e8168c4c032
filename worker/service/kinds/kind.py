"""What a job kind is: the parts its module declares, read once when the kind is registered.

A kind's module holds
- `NAME`: the kind as job records name it;
- `Body`: its request body, a pydantic model extending `bodies.Submission` (output, metadata, webhook_url);
  a kind that runs a recipe (a graft, a preflight) extends `bodies.Models`, whose recipe the API builds;
- `ROUTE`: how the API offers it (`Route`);
- `spec(body) -> dict | None`: what the worker needs of the body beyond the recipe (stored with the record,
  never shown; None: nothing);
- `run(request, spec, settings, reporter) -> dict`: the runner, in the job's process, publishing what it writes
  through worker/engine/pipeline/publish.py `publishing`; it returns the record's result (uri, manifest_uri,
  files and stats, as the API's Result states them, and keys of its own) and imports the engine's heavy parts
  (torch) inside itself, because the API imports the module for its body;
- optionally `check(body)`: what the schema cannot say, raised as `bodies.BodyError`;
- optionally `shown(spec) -> dict | None`: the spec as a job shows it (default: as it is);
- `fields(body) -> dict`, for a body that is no `Models`: the record's fields naming what the job reads
  (`source_base`, `source_finetuned`, `target_base`, `options`; a `Models` body's come from its recipe);
- optionally `inputs(record) -> dict[str, str]`: field -> URI of every input the job reads, which the API and
  the worker check against the tenant's URI policy (default: the recipe's, recipes.recipe_inputs);
- optionally `request(record, spec, job_id, confinement)`: the engine request the runner is given (default:
  the recipe's GraftRequest, recipes.recipe_request), built in the job's process;
- optionally `COLLECTION` and `collect(pipe, store, tenant, record)`: the kind's succeeded jobs are also
  records of a collection of their own (worker/service/collections.py: `diffs`, `loras`); `collect` queues
  what the transaction that marks a job succeeded also writes for it (its index entry).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from worker.service.kinds import recipes
from worker.service.kinds.bodies import Models, Submission
from worker.service.settings import Settings

Runner = Callable[[Any, dict, Settings, Any], dict]  # (request, spec, settings, reporter) -> the record's result
# snake_case words: the handler's name is create_<noun>, its operationId create<Noun> (app/main.py camelCases).
NOUN = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


@dataclass(frozen=True)
class Route:
    """POST /v1{path} submits a job of the kind. `noun` is what the route creates (`job`, `preflight`): the
    handler is `create_<noun>` and its OpenAPI operationId `create<Noun>`, so a generated client reads
    `create_job(...)`; `responses`: status codes (with their descriptions) beyond those every submitting route
    answers."""

    path: str
    noun: str
    summary: str
    description: str | None = None
    responses: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        # A handler's name given as the noun would make createCreateJob: refused where it is declared.
        if not NOUN.fullmatch(self.noun) or self.noun.startswith("create"):
            raise ValueError(f"Route {self.path}: noun {self.noun!r} must be snake_case words naming what the "
                             "route creates (`job`, not `create_job`)")

    @property
    def name(self) -> str:
        return f"create_{self.noun}"


@dataclass
class Progress:
    """A job's progress in the fields the job record's progress has (worker/service/jobs.py's reporter), for a
    runner whose engine reports its own measure (a diff extraction's bytes read, a LoRA export's modules); what
    such a job writes is the smaller part and is not counted as it goes."""

    phase: Any
    tensors_done: int
    tensors_total: int
    bytes_read: int
    bytes_total: int | None
    fraction: float
    bytes_written: int = 0


def _nothing(body: Submission) -> None:
    return None


def _no_fields(body: Submission) -> dict:
    raise TypeError(f"{type(body).__name__} is no Models body: its kind must declare fields(body)")


def _as_is(spec: dict | None) -> dict | None:
    return spec or None


@dataclass(frozen=True)
class Kind:
    name: str
    body: type[Submission]
    route: Route
    spec: Callable[[Submission], dict | None]
    runner: Runner
    check: Callable[[Submission], None] = _nothing
    shown: Callable[[dict | None], dict | None] = _as_is
    fields: Callable[[Submission], dict] = _no_fields
    inputs: Callable[[dict], dict[str, str]] = recipes.recipe_inputs
    request: Callable[[dict, dict, str, dict], Any] = recipes.recipe_request
    collection: str | None = None
    collect: Callable[..., None] | None = None

    @property
    def takes_recipe(self) -> bool:
        """Its body names the models as a recipe (`Models`): the API builds the recipe the record stores."""
        return issubclass(self.body, Models)

    @classmethod
    def of(cls, module: Any) -> Kind:
        """The kind a module (or any object with the same attributes) declares; refused by name when a part
        is missing or of the wrong sort."""
        where = getattr(module, "__name__", repr(module))
        missing = [n for n in ("NAME", "Body", "ROUTE", "spec", "run") if not hasattr(module, n)]
        if missing:
            raise TypeError(f"job kind {where}: missing {', '.join(missing)}")
        if not (isinstance(module.Body, type) and issubclass(module.Body, Submission)):
            raise TypeError(f"job kind {where}: Body must extend worker.service.kinds.bodies.Submission")
        if not issubclass(module.Body, Models) and not hasattr(module, "fields"):
            raise TypeError(f"job kind {where}: a Body that is no bodies.Models needs fields(body)")
        if not isinstance(module.ROUTE, Route):
            raise TypeError(f"job kind {where}: ROUTE must be a kinds.Route")
        if (getattr(module, "COLLECTION", None) is None) != (getattr(module, "collect", None) is None):
            raise TypeError(f"job kind {where}: COLLECTION and collect(...) go together")
        optional = {name: getattr(module, name) for name in ("check", "shown", "fields", "inputs", "request",
                                                              "collect") if hasattr(module, name)}
        return cls(module.NAME, module.Body, module.ROUTE, module.spec, module.run,
                   collection=getattr(module, "COLLECTION", None), **optional)

    def run(self, request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
        return self.runner(request, spec, settings, reporter)
