"""Request and response bodies: the contract openapi.yaml is generated from."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

from worker.engine.checks.checked_graft import MAX_SWEEP, Checks
from worker.engine.checks.evaluation.spec import ProbeText
from worker.engine.checks.inspect.verdict import LEVEL_HELP, Level
from worker.engine.errors import GraftError
from worker.engine.planning.options import FLOAT32_MAX, check_alpha
from worker.engine.planning.recipe import Diff, Merge, RecipeOptions, Rule
from worker.engine.storage import schemes
from worker.service.statuses import JobKind, JobStatus

Status = JobStatus
# A scheme, then no spaces or control characters: spelled out, because \\s differs between Python, Rust
# (pydantic) and the ECMA regexes of JSON Schema (U+0085, U+001C..U+001F).
URI_PATTERN = r"^({})://[^\x00-\x20\x7f-\x9f]+$"
URI_FIELD = {"min_length": 1, "max_length": 2048, "pattern": URI_PATTERN.format(schemes.pattern()),
             "description": schemes.forms()}
URI = Field(**URI_FIELD)
# Hard caps of the schema; GRAFT_MAX_METADATA_BYTES bounds the whole map below them.
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
MetaValue = Annotated[str, StringConstraints(max_length=1024)]


def _alpha(value: object) -> float | list[float]:
    """One error naming options.alpha, rather than one per member of a union; each number checked as the
    engine checks it (finite, within float32's range: a 400-digit integer was an OverflowError here)."""
    try:
        if isinstance(value, list) and 2 <= len(value) <= MAX_SWEEP:
            return [check_alpha(v) for v in value]
        if not isinstance(value, list):
            return check_alpha(value)
    except GraftError:
        pass
    raise PydanticCustomError("alpha", f"a finite JSON number within float32's range (about 3.4e38), or a list "
                              f"of 2 to {MAX_SWEEP} of them (a sweep)")


_NUMBER = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}  # as check_alpha holds it
Alpha = Annotated[float | list[float], PlainValidator(_alpha), WithJsonSchema(
    {"anyOf": [_NUMBER, {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": MAX_SWEEP}]})]


class Options(RecipeOptions):
    """What `graft run` takes: the engine's options (declared once, in worker/engine/planning/recipe.py) and alpha."""

    alpha: Alpha = Field(1.0, description="scale of the diff (a JSON number); with `diffs`, `rules` or a "
                         "mergekit_config, a factor on the merged delta (the merge's lambda). A list is a sweep: "
                         "each value scales it in its own candidate, which is built and evaluated, and only the "
                         "one `select` picks is published")


def _metadata_schema(schema: dict) -> None:
    """pydantic states the key pattern as patternProperties, under which keys that miss the pattern may hold
    anything; the API refuses them, and so must the contract."""
    pattern = schema.pop("patternProperties", None) or {}
    for key_pattern, value_schema in pattern.items():
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": key_pattern}
        schema["additionalProperties"] = value_schema


def _either_diffs_or_three_fields(schema: dict) -> None:
    """The models come one way of three: today's three fields, target_base with `diffs`, or a mergekit config
    alone (the schema says so, and the handler checks the same)."""
    def given(*names: str, kind: str = "string") -> dict:  # present and not null
        return {"required": list(names), "properties": {n: {"type": kind} for n in names}}

    models = ("target_base", "source_base", "source_finetuned")
    schema["anyOf"] = [{"required": ["target_base", "diffs"],
                        "properties": {"target_base": {"type": "string"}, "diffs": {"type": "array"}},
                        "not": {"anyOf": [given("source_base"), given("source_finetuned"), given("mergekit_config")]}},
                       {**given(*models), "not": {"anyOf": [given("diffs", kind="array"), given("mergekit_config")]}},
                       {**given("mergekit_config"),
                        "not": {"anyOf": [*(given(m) for m in models), given("diffs", kind="array"),
                                          given("merge", kind="object"), given("rules", kind="array")]}}]


class Models(BaseModel):
    """What a graft job and a preflight share: the models (one of three ways), how they combine, where the job
    writes, labels and a webhook."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_either_diffs_or_three_fields)
    source_base: str | None = Field(None, **URI_FIELD)
    source_finetuned: str | None = Field(None, **URI_FIELD)
    target_base: str | None = Field(None, **URI_FIELD)
    diffs: list[Diff] | None = Field(None, min_length=1, max_length=16, description="a recipe's diffs, in place of "
                                     "source_base and source_finetuned (see README: recipes)")
    merge: Merge | None = Field(None, description="how a recipe's diffs combine (default: sum)")
    rules: list[Rule] | None = Field(None, max_length=100, description="a recipe's per-tensor overrides")
    mergekit_config: str | None = Field(None, min_length=1, max_length=64 << 10, description="a mergekit YAML "
                                        "of the task-vector family, in place of the models, merge and rules "
                                        "(its base_model is the target and every diff's base)")
    output: str | None = Field(None, min_length=1, max_length=2048,
                               pattern=URI_PATTERN.format(schemes.pattern(writable=True)),
                               description=f"{schemes.prefixes(writable=True)} prefix for what the job writes (a "
                                           "graft's checkpoint, a preflight's report.json and chart); default "
                                           "GRAFT_OUTPUT_URI/<tenant>/<job id>/")
    options: Options = Field(default_factory=Options)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=32, json_schema_extra=_metadata_schema,
                                               description="labels returned as given: at most 32, keys of at most 64 "
                                                           "characters, values of at most 1024")
    webhook_url: str | None = Field(None, min_length=1, max_length=2048,
                                    pattern=URI_PATTERN.format("[Hh][Tt][Tt][Pp][Ss]?"),
                                    description="POSTed the job on a terminal status; must reach a public address")


class JobCreate(Models, Checks):
    """A graft job: the models and, optionally, its checks (evaluate, select with a list of alphas, require)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_either_diffs_or_three_fields)


class PreflightCreate(Models):
    """A compatibility check of a graft's inputs, run by the workers as a job of its own kind. With several
    diffs, each is judged against the target and the verdict is the worst."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_either_diffs_or_three_fields)
    level: Level = Field(Level.WEIGHTS, description=LEVEL_HELP)
    probe_text: ProbeText | None = Field(None, description="the function level's probe text (at most 64 KiB of "
                                         "UTF-8; default: one built into graft)")


class Progress(BaseModel):
    phase: str
    tensors_done: int
    tensors_total: int
    bytes_read: int
    bytes_written: int
    bytes_total: int | None = None
    fraction: float
    eta_seconds: float | None = None


class FileOut(BaseModel):
    path: str
    size: int
    sha256: str


class Result(BaseModel):
    uri: str
    manifest_uri: str
    files: list[FileOut]
    stats: dict[str, Any]
    evaluation: dict[str, Any] | None = Field(None, description="the output run on the probe text and prompts "
                                              "(when the job asked `evaluate`, or swept alpha)")
    sweep: dict[str, Any] | None = Field(None, description="every candidate alpha's score; chosen_alpha was published")
    preflight: dict[str, Any] | None = Field(None, description="the verdict `require: compatible` checked")
    report: dict[str, Any] | None = Field(None, description="a preflight's report: verdict, reasons, the numbers")
    chart_uri: str | None = Field(None, description="a preflight's per-layer chart (PNG)")


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class Job(BaseModel):
    id: str
    object: Literal["graft.job"] = "graft.job"
    kind: JobKind = Field(JobKind.GRAFT, description="a graft, or a preflight (POST /v1/preflights)")
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    source_base: str
    source_finetuned: str
    target_base: str
    output: str
    options: dict[str, Any]
    recipe: dict[str, Any] | None = Field(None, description="the recipe, when the job is more than the plain "
                                          "transfer (several diffs, transforms, a merge method, rules)")
    checks: dict[str, Any] | None = Field(None, description="what the job asked beyond the graft: evaluate (the "
                                          "probe text shown by its length), select, require, the swept alphas; a "
                                          "preflight's level")
    metadata: dict[str, str]
    webhook_url: str | None = None
    attempt: int
    max_attempts: int
    progress: Progress | None = None
    result: Result | None = None
    error: JobError | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    at: str
    type: str


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]


class Plan(BaseModel):
    """The --dry-run plan, from safetensors headers alone."""

    model_config = ConfigDict(extra="allow")
    object: Literal["graft.plan"] = "graft.plan"
    tensors_total: int
    actions: dict[str, int]
    output_bytes: int
    shards: list[dict[str, Any]]


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
