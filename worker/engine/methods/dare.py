"""`dare`: drop each delta element with probability `drop`; `rescale` says what happens to the survivors:
`inverse` (graft's default, the DARE paper's): divided by 1 - drop; true (mergekit's `rescale: true`, as for
every transform): scaled so that the delta keeps its L1 norm (worker/engine/methods/statistics/l1.py); false
(mergekit's `rescale: false`): left as they are.

The draw is a counter-based hash of (seed, tensor name, element index), not a stateful generator: the same
recipe keeps the same elements whatever the block size, the device or a split of the job over workers. It
is not mergekit's torch.bernoulli draw, so a DARE merge cannot agree with mergekit's element for element;
with the same density both keep each element with the same probability."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

from worker.engine.methods.base import TransformMethod, later_field
from worker.engine.methods.statistics.l1 import L1Rescale

_M32 = 0xFFFFFFFF


class DareParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["dare"]
    drop: float = Field(ge=0, lt=1, description="probability that an element of the delta is dropped")
    seed: int = Field(0, ge=0, lt=2**32, description="the draw's seed")
    rescale: Literal["inverse", True, False] = later_field(
        "inverse", "the survivors: inverse, divided by 1 - drop (the DARE paper's); true, scaled to the delta's "
        "L1 norm (mergekit's rescale: true); false, as they are (mergekit's rescale: false)")


RESCALE_DARE = ("inverse: survivors divided by the density (the DARE paper's); true: scaled to the delta's L1 "
                "norm (mergekit's rescale: true); false: as they are")


def draw_key(seed: int, tensor: str) -> int:
    """32 bits naming (seed, tensor): the draw's stream for one tensor."""
    digest = hashlib.sha256(f"{seed}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def uniform32(key: int, start: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """A 32-bit hash (murmur3's finaliser over key ^ index, twice) per element index in [start, start+count),
    as int64 in [0, 2**32). Products of two 32-bit values are kept below 2**63 by splitting the constant."""
    import torch

    x = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = ((x & _M32) ^ key) ^ ((x >> 32) * 0x9E3779B1 & _M32)
    for _ in range(2):
        x = x ^ (x >> 16)
        x = _mul32(x, 0x85EBCA6B)
        x = x ^ (x >> 13)
        x = _mul32(x, 0xC2B2AE35)
        x = x ^ (x >> 16)
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, without an int64 overflow: c split into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


class Dare(TransformMethod):
    name = "dare"
    Params = DareParams
    statistics = (L1Rescale,)

    def l1_rescale(self, params: DareParams) -> bool:
        return params.rescale is True and params.drop > 0

    def apply(self, delta, params: DareParams, chunk):
        import torch

        if params.drop <= 0:
            return None
        cut = int(params.drop * 2**32)
        keep = torch.ge(uniform32(chunk.key, chunk.start, delta.numel(), delta.device), cut,
                        out=chunk.scratch("spare"))  # 1.0 / 0.0
        delta.mul_(keep)
        if params.rescale == "inverse":
            delta.div_(1.0 - params.drop)
        return int(keep.sum())
