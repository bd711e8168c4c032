"""Request and response bodies: the contract openapi.yaml is generated from. The request bodies are the job
kinds' (worker/service/kinds), re-exported here where the API names them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from worker.service.kinds import DEFAULT, KINDS
from worker.service.kinds.bodies import Models, Options, Submission
from worker.service.kinds.diff_extract import DiffCreate
from worker.service.kinds.graft import JobCreate
from worker.service.kinds.preflight import PreflightCreate
from worker.service.statuses import JobStatus

__all__ = ["DiffCreate", "JobCreate", "Models", "Options", "PreflightCreate", "Submission"]

Status = JobStatus


class JobKind(str):
    """A job's kind: its JSON schema is the table's kinds when the schema is generated (an enum declared here
    would be a second list of the kinds)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.str_schema(ref="JobKind")

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        routes = ", ".join(f"{k.name} (POST /v1{k.route.path})" for k in KINDS.values())
        return {"type": "string", "enum": list(KINDS), "title": "JobKind",
                "description": f"What a job does, and the route that submits it: {routes}."}


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
    diff: dict[str, Any] | None = Field(None, description="a diff extraction's manifest summary: format, encoding, "
                                        "totals (sizes, reconstruction errors), content_address, sources "
                                        "(provenance), engine")


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class Job(BaseModel):
    id: str
    object: Literal["graft.job"] = "graft.job"
    kind: JobKind = Field(DEFAULT, description="what the job does (JobKind lists the kinds and their routes)")
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    source_base: str | None = Field(None, description="the first diff's base (null where it is a diff artifact)")
    source_finetuned: str | None = Field(None, description="the first diff's fine-tune (null where it is a diff "
                                         "artifact)")
    diff: str | None = Field(None, description="the first diff's artifact URI, where the job applies one (a diff's "
                             "id is resolved to it at submission)")
    target_base: str | None = Field(None, description="null for a diff extraction")
    output: str
    options: dict[str, Any] = Field(description="the engine options (a diff extraction's: encoding, shard_size)")
    recipe: dict[str, Any] | None = Field(None, description="the recipe the job runs (a plain transfer is a "
                                          "one-diff recipe whose weight is alpha); the URIs and options beside it "
                                          "repeat it for the reader")
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
    deleted_at: str | None = Field(None, description="a diff extraction's: when its diff was deleted "
                                   "(DELETE /v1/diffs/{id})")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None


DiffStatus = Literal[(*(s.value for s in JobStatus), "deleting", "deleted")]  # type: ignore[valid-type]


class DiffArtifact(BaseModel):
    """A diff: the artifact a diff_extract job published (its id is the job's), with its provenance, encoding,
    sizes and reconstruction errors; the per-tensor table is in the artifact's diff-manifest.json."""

    id: str
    object: Literal["graft.diff"] = "graft.diff"
    status: DiffStatus = Field(description="the extraction's status; once deleted: deleting (its files being "
                               "removed), then deleted")
    job: str = Field(description="the extraction job (GET it for its progress and events)")
    created_at: str
    finished_at: str | None = None
    deleted_at: str | None = None
    source_base: str
    source_finetuned: str
    uri: str = Field(description="where the artifact is (or was)")
    manifest_uri: str | None = None
    encoding: dict[str, Any] = Field(description="the encoding and its parameters")
    shard_size: int
    content_address: str | None = Field(None, description="sha256 of the encoding and of every file's digest")
    sources: dict[str, Any] | None = Field(None, description="provenance: per source, its URI, resolved revision "
                                           "and file digests")
    totals: dict[str, Any] | None = Field(None, description="tensors (and per encoding how many it stored), "
                                          "encoded_bytes, finetuned_bytes, ratio_to_finetuned, rel_frobenius (the "
                                          "delta-weighted reconstruction error), rel_frobenius_max, max_abs")
    engine: dict[str, Any] | None = None
    files: list[FileOut] | None = None
    stats: dict[str, Any] | None = None
    progress: Progress | None = None
    error: JobError | None = None
    metadata: dict[str, str]


class DiffList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DiffArtifact]
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
