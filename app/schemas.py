"""Request and response bodies: the contract openapi.yaml is generated from. The request bodies are the job
kinds' (worker/service/kinds), re-exported here where the API names them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, create_model
from pydantic_core import core_schema

from worker.service.kinds import DEFAULT, KINDS
from worker.service.kinds.bodies import Models, Options, Submission
from worker.service.kinds.diff_extract import DiffCreate
from worker.service.kinds.graft import JobCreate
from worker.service.kinds.lora_export import LoraCreate
from worker.service.kinds.preflight import PreflightCreate
from worker.service.statuses import JobStatus

__all__ = ["DiffCreate", "JobCreate", "LoraCreate", "Models", "Options", "PreflightCreate", "Submission"]

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
    lora: dict[str, Any] | None = Field(None, description="a LoRA export's manifest summary: rank, bytes, inputs "
                                        "and their digests, totals, modules grouped across layers, left_out (see "
                                        "GET /v1/loras/{id})")


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
    options: dict[str, Any] = Field(description="the engine options (a diff extraction's: encoding, shard_size; a "
                                    "LoRA export's: its parameters)")
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
    deleted_at: str | None = Field(None, description="a diff extraction's or a LoRA export's: when its diff or "
                                   "adapter was deleted (DELETE /v1/diffs/{id}, /v1/loras/{id})")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None


CollectionStatus = Literal[(*(s.value for s in JobStatus), "deleting", "deleted")]  # type: ignore[valid-type]


class CollectionRecord(BaseModel):
    """What every kind's collection record shows (worker/service/collections.py): its job, where its output is, its
    files and stats; its id is the job's."""

    id: str
    status: CollectionStatus = Field(description="the job's status; once deleted: deleting (its files being "
                                     "removed), then deleted")
    job: str = Field(description="the job that made it (GET it for its progress and events)")
    created_at: str
    finished_at: str | None = None
    deleted_at: str | None = None
    uri: str = Field(description="where the output is (or was)")
    manifest_uri: str | None = None
    engine: dict[str, Any] | None = None
    files: list[FileOut] | None = None
    stats: dict[str, Any] | None = None
    progress: Progress | None = None
    error: JobError | None = None
    metadata: dict[str, str]


def _page(item: type[BaseModel], name: str) -> type[BaseModel]:
    """A page of a collection's records, as GET /v1/<collection> answers."""
    return create_model(name, __module__=__name__, object=(Literal["list"], "list"), data=(list[item], ...),
                        has_more=(bool, ...), last_id=(str | None, ...))


class DiffArtifact(CollectionRecord):
    """A diff: the artifact a diff_extract job published (its id is the job's), with its provenance, encoding,
    sizes and reconstruction errors; the per-tensor table is in the artifact's diff-manifest.json."""

    object: Literal["graft.diff"] = "graft.diff"
    source_base: str
    source_finetuned: str
    encoding: dict[str, Any] = Field(description="the encoding and its parameters")
    shard_size: int
    content_address: str | None = Field(None, description="sha256 of the encoding and of every file's digest")
    sources: dict[str, Any] | None = Field(None, description="provenance: per source, its URI, resolved revision "
                                           "and file digests")
    totals: dict[str, Any] | None = Field(None, description="tensors (and per encoding how many it stored), "
                                          "encoded_bytes, finetuned_bytes, ratio_to_finetuned, rel_frobenius (the "
                                          "delta-weighted reconstruction error), rel_frobenius_max, max_abs")


class LoraAdapter(CollectionRecord):
    """A LoRA adapter: what a lora_export job published (its id is the job's): adapter_config.json,
    adapter_model.safetensors and lora-manifest.json, which holds the per-module table summarised here."""

    object: Literal["graft.lora"] = "graft.lora"
    source_base: str | None = Field(None, description="the pair's base (null where the delta came from a diff)")
    source_finetuned: str | None = None
    diff: str | None = Field(None, description="the diff artifact's URI (a diff's id is resolved at submission)")
    target_base: str
    options: dict[str, Any] = Field(description="the export's parameters as run (rank or energy, profile, "
                                    "modules, alpha, ...)")
    profile: str | None = None
    rank: int | None = Field(None, description="the adapter's rank (every module's factors padded to it)")
    bytes: int | None = Field(None, description="the adapter's size: its files but the manifest")
    inputs: dict[str, Any] | None = Field(None, description="the inputs' URIs, a diff's content address, and per "
                                          "input its files' sizes and sha256")
    totals: dict[str, Any] | None = Field(None, description="delta_sq (||delta||^2), factored_share, "
                                          "left_out_share, rel_frobenius_lora (the factored modules' relative "
                                          "error)")
    modules: dict[str, Any] | None = Field(None, description="the LoRA modules: count, per name across layers "
                                           "(model.layers.*.mlp.up_proj) count, rank, retained_energy_min, "
                                           "rel_frobenius_max, max_abs; the worst modules by relative error")
    left_out: dict[str, Any] | None = Field(None, description="what the profile cannot carry: tensors, share of "
                                            "||delta||^2, per name across layers and reason the same and a few "
                                            "names")
    modules_to_save: dict[str, int] | None = Field(None, description="modules carried whole, counted per name "
                                                   "across layers")
    lora_bias: dict[str, int] | None = Field(None, description="modules whose bias delta is lora_B.bias, counted "
                                             "per name across layers")
    fidelity: dict[str, Any] | None = Field(None, description="with evaluate or ranks: per rank the probe loss and "
                                            "the KL of target + adapter to the full graft and to the fine-tune "
                                            "(curve), max_kl and the rank published (picked_rank)")
    warnings: list[dict[str, Any]] = Field(default_factory=list, description="e.g. no_rank_within_max_kl")


DiffList = _page(DiffArtifact, "DiffList")
LoraList = _page(LoraAdapter, "LoraList")


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
