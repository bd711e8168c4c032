"""Request and response bodies: the contract openapi.yaml is generated from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "validating", "running", "committing", "succeeded", "failed", "cancelling", "cancelled"]
URI = Field(min_length=1, max_length=2048, description="file:///abs/path, s3://bucket/prefix or hf://org/name[@rev]")


class Options(BaseModel):
    """What `graft run` takes."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, description="scale of the diff")
    vocab: Literal["extend", "target"] = "extend"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    shard_size: int | str = Field("5GB", description="largest output shard: bytes or e.g. '500MB'")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    include: list[str] = Field(default_factory=list, max_length=100, description="regexes: only these get the diff")
    exclude: list[str] = Field(default_factory=list, max_length=100, description="regexes: copied from the target")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_base: str = URI
    source_finetuned: str = URI
    target_base: str = URI
    output: str | None = Field(None, max_length=2048,
                               description="file:// or s3:// prefix; default GRAFT_OUTPUT_URI/<job id>/")
    options: Options = Field(default_factory=Options)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32,
                                     description="free-form labels, returned as given")
    webhook_url: str | None = Field(None, max_length=2048, description="POSTed the job on a terminal status")


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


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    object: Literal["graft.job"] = "graft.job"
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    source_base: str
    source_finetuned: str
    target_base: str
    output: str
    options: dict[str, Any]
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
