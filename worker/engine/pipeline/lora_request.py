"""What a LoRA export is asked to do, declared once and importable without torch: the CLI's flags, the API's
body (the `lora_export` job kind) and the job record come from `LoraExport`; `LoraExportRequest` adds who may read
what (as GraftRequest does for a graft). The export itself is pipeline/lora_export.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.engine.diffs.encoding_params import MAX_RANK
from worker.engine.errors import GraftError
from worker.engine.planning.patterns import compile_pattern
from worker.engine.planning.recipe import URI

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
# Every 2-D weight of the decoder blocks: Llama's `layers.N.`, GPT-2's `h.N.`.
DEFAULT_MODULES = r"(^|\.)(layers|h)\.\d+\."
DEFAULT_RANK = 64
DEFAULT_MAX_KL = 0.05  # nats per token: the mean KL(full graft || target + adapter) a sweep's pick stays within
MAX_SWEEP = 8  # ranks in a sweep: each is an adapter plus two evaluations


class LoraExport(BaseModel):
    """What the adapter is made from and how."""

    model_config = ConfigDict(extra="forbid")
    source_base: URI | None = Field(None, description="the base the fine-tune started from (with "
                                    "source_finetuned; or give diff)")
    source_finetuned: URI | None = Field(None, description="the fine-tune whose update becomes the adapter")
    diff: URI | None = Field(None, description="a diff artifact in place of the source pair")
    target_base: URI = Field(description="the base the adapter is for: its shapes are checked and what the "
                             "adapter cannot carry is computed on it")
    output: URI
    rank: int | None = Field(None, ge=1, le=MAX_RANK, description=f"the adapter's rank (default {DEFAULT_RANK}; "
                             "vllm rounds it up to one vLLM allows)")
    energy: float | None = Field(None, gt=0, lt=1, description="in place of rank: the smallest rank per module "
                                 "keeping this share of ||delta||^2")
    profile: Literal["vllm", "peft"] = Field("vllm", description="vllm: LoRA on linear modules only, what vLLM "
                                             "loads; peft: also norms, embeddings and biases PEFT can carry")
    modules: str = Field(DEFAULT_MODULES, max_length=1000,
                         description="RE2 pattern searched in a module's name: the modules that get LoRA")
    alpha: float = Field(1.0, ge=-1e6, le=1e6, allow_inf_nan=False, description="the transfer's strength")
    power_iterations: int = Field(1, ge=0, le=4, description="the randomized SVD's power iterations (each one "
                                  "two more reads of a module's delta; more: closer to the optimal factor)")
    seed: int = Field(0, ge=0, le=2**53 - 1, description="the randomized SVD's sketch seed")
    factor_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the stored dtype of lora_A, lora_B and lora_B.bias (computed in float32, rounded "
        "once): bfloat16 halves the adapter, which vLLM casts to the model's dtype anyway; the manifest's errors "
        "are the float32 factors'")
    ranks: list[int] | None = Field(None, min_length=2, max_length=MAX_SWEEP, description=f"a rank sweep (2 to "
                                    f"{MAX_SWEEP} ranks, in place of rank): each adapter evaluated against the full "
                                    "graft and the fine-tune; the smallest rank within max_kl is published")
    evaluate: bool = Field(False, description="measure the adapter's fidelity (probe loss, KL to the full graft "
                           "and to the fine-tune, as `graft run --evaluate` does) and record it in the manifest; "
                           "implied by ranks")
    max_kl: float = Field(DEFAULT_MAX_KL, gt=0, le=100, allow_inf_nan=False, description="a sweep picks the "
                          "smallest rank whose mean KL(full graft || target + adapter) over the prompts is at most "
                          f"this (nats per token; default {DEFAULT_MAX_KL})")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="where the factorization runs: auto takes "
                                                   "the GPU when one is visible; cuda fails without one")

    @model_validator(mode="after")
    def _inputs(self) -> LoraExport:
        pair = self.source_base is not None and self.source_finetuned is not None
        if pair == (self.diff is not None) or (not pair and (self.source_base or self.source_finetuned)):
            raise ValueError("give source_base and source_finetuned, or diff, not both")
        if sum(x is not None for x in (self.rank, self.energy, self.ranks)) > 1:
            raise ValueError("give one of rank, ranks or energy")
        if self.ranks is not None:
            if any(not 1 <= r <= MAX_RANK for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
                raise ValueError(f"ranks: distinct values from 1 to {MAX_RANK}")
            if self.profile == "vllm" and any(r > VLLM_RANKS[-1] for r in self.ranks):
                raise ValueError(f"ranks: vLLM's largest rank is {VLLM_RANKS[-1]}")
            if self.diff is not None:
                raise ValueError("ranks: a sweep measures against the fine-tune: give the source pair, not diff")
            self.ranks = sorted(self.ranks)
        if self.evaluate and self.diff is not None:
            raise ValueError("evaluate: the evaluation compares with the fine-tune: give the source pair, not diff")
        if self.rank is None and self.energy is None and self.ranks is None:
            self.rank = DEFAULT_RANK
        try:
            compile_pattern(self.modules, "modules")
        except GraftError as exc:
            raise ValueError(exc.message) from None
        return self


@dataclass
class LoraExportRequest:
    spec: LoraExport
    writer: str | None = None
    allowed_roots: list[str] | None = None
    denied_roots: list[str] | None = None

    def inputs(self) -> dict[str, str]:
        if self.spec.diff is not None:
            return {"diff": self.spec.diff, "target_base": self.spec.target_base}
        return {"source_base": self.spec.source_base, "source_finetuned": self.spec.source_finetuned,
                "target_base": self.spec.target_base}


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts at or above `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise GraftError("invalid_rank", f"rank {rank} is above vLLM's largest ({VLLM_RANKS[-1]})")
