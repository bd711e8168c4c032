"""The encodings' parameters, declared without torch: what a diff extraction's request takes (the API's body, the
CLI's flags, the job record), importable where the encodings themselves (worker/engine/diffs/encodings, which
import torch) must not be. Each encoding module takes its `Params` from here; encodings/__init__.py checks that
its table and `PARAMS` name the same models.

`EncodingParams` is one of the models, by its `encoding` field; a mapping without one, or nothing, is exact; a
bare name (`"sparse"`) is that encoding at its defaults."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

FALLBACK = "exact"
MAX_RANK = 4096


class ExactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["exact"] = "exact"


class Bf16Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["bf16"]


class Int8Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["int8"]


class SignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["sign"]


class SparseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["sparse"]
    density: float = Field(0.1, gt=0, le=1, description="fraction of each tensor's elements kept, the largest "
                           "|delta| (k = ceil(density * numel))")


def _rank_or_energy_schema(schema: dict) -> None:
    both = {"required": ["rank", "energy"], "properties": {"rank": {"type": "integer"}, "energy": {"type": "number"}}}
    schema["not"] = both  # as the validator below holds it


class LowRankParams(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rank_or_energy_schema)
    encoding: Literal["lowrank"]
    rank: int | None = Field(None, ge=1, le=MAX_RANK, description="the rank kept (64 unless energy is given)")
    energy: float | None = Field(None, gt=0, lt=1, description="instead of rank: the smallest rank keeping this "
                                 "share of the delta's squared Frobenius norm")
    power_iterations: int = Field(1, ge=0, le=4, description="power iterations of the randomized SVD (each reads "
                                  "the tensor twice more)")
    seed: int = Field(0, ge=0, le=2**53 - 1, description="the random projection's seed (an integer JSON numbers hold "
                      "exactly: at most 2**53 - 1)")

    @model_validator(mode="after")
    def _rank_or_energy(self) -> LowRankParams:
        if self.rank is not None and self.energy is not None:
            raise ValueError("lowrank takes rank or energy, not both")
        if self.rank is None and self.energy is None:
            self.rank = 64
        return self


# In the order of the encodings' table (encodings/__init__.py).
PARAMS: dict[str, type[BaseModel]] = {"exact": ExactParams, "bf16": Bf16Params, "int8": Int8Params,
                                      "sign": SignParams, "sparse": SparseParams, "lowrank": LowRankParams}


def _named(value: object) -> object:
    if value is None:
        return {"encoding": FALLBACK}
    if isinstance(value, str):
        return {"encoding": value}
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict) and "encoding" not in value:
        return {**value, "encoding": FALLBACK}
    return value


EncodingParams = Annotated[Union[tuple(PARAMS.values())],  # noqa: UP007
                           Field(discriminator="encoding"), BeforeValidator(_named)]
