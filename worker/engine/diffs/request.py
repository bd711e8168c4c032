"""What a diff extraction is asked to do, declared once: the API's body, the CLI's flags and the job record
come from `DiffExtract`; `DiffExtractRequest` adds where it writes and who may read what (as GraftRequest
does for a graft)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# The parameters' torch-free declarations: the API's body is this model (the encodings import torch).
from worker.engine.diffs.encoding_params import EncodingParams, ExactParams
from worker.engine.planning.recipe import URI

DEFAULT_SHARD = 2 * 10**9


class DiffExtract(BaseModel):
    """The diff of a fine-tune against its base, extracted once and stored exact or compressed."""

    model_config = ConfigDict(extra="forbid")
    source_base: URI
    source_finetuned: URI
    encoding: EncodingParams = Field(default_factory=ExactParams,
                                     description="how the delta is stored (exact: byte for byte what the "
                                     "pair gives; the others compress it, each with its measured error)")
    shard_size: int = Field(DEFAULT_SHARD, ge=1 << 20, le=5 * 10**12,
                            description="encoded bytes per artifact shard (a tensor's parts stay in one shard)")


@dataclass
class DiffExtractRequest:
    spec: DiffExtract
    output: str
    writer: str | None = None  # as GraftRequest's
    allowed_roots: list[str] | None = None
    denied_roots: list[str] | None = None

    def inputs(self) -> dict[str, str]:
        return {"source_base": self.spec.source_base, "source_finetuned": self.spec.source_finetuned}
