"""DELLA (mergekit 0.1.5's della_magprune sparsification and its `della` / `della_linear` merges).

The `della` transform (mergekit's della_magprune) drops each element of a row (a matrix's last dimension; a
vector is one row) at random, with a keep probability that grows with its magnitude rank in the row: ranks
r = 0..n-1 ascending by |delta|, p = (density - epsilon) + r / (n - 1) * 2 * epsilon, formed in float32 as
mergekit forms it (a one-element row, where mergekit divides 0 by 0, takes p = density). Survivors are not
divided by p: `rescale` (on by default, as mergekit's della methods) scales the pruned delta back to the
delta's L1 norm over the tensor.

Where it differs from mergekit: the draw is graft's counter-based hash of (seed, diff, tensor, element)
(worker/engine/methods/dare.py), kept iff hash / 2**32 < p, not torch.bernoulli, so the bytes do not depend on
the block size or the device but cannot agree with mergekit's element for element; elements of equal
magnitude in a row are ranked in element order (a stable sort), where mergekit's argsort orders them as it
happens to.

The `della` merge then elects signs and takes the disjoint mean as ties does (normalize on by default);
`della_linear` sums the weighted deltas as task arithmetic does (normalize off by default); both times
`lambda`. (An imported mergekit config says the same as a `ties` or `sum` merge over `della` transforms, which
also take a density per diff and per layer.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from worker.engine.methods.base import INT8_MASK, MergeMethod, TransformMethod
from worker.engine.methods.dare import uniform32
from worker.engine.methods.statistics.l1 import L1Rescale
from worker.engine.methods.statistics.rows import WholeRows
from worker.engine.methods.sum import weighted_sum
from worker.engine.methods.ties import elect

if TYPE_CHECKING:
    import torch

EPSILON = "half the spread of the keep probabilities around density, by magnitude rank within a row"
RESCALE = "mergekit's rescale: the pruned delta scaled back to the delta's L1 norm"


def _check_spread(density: float, epsilon: float) -> None:
    if not (isinstance(density, float | int) and isinstance(epsilon, float | int)):
        return  # lists over the layers (a recipe's): checked at each depth (planning.recipe.transform_at)
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        # A refusal no schema states (a relation of two fields): typed as the recipe's, as the API reports them.
        raise PydanticCustomError("invalid_recipe", "epsilon: density ± epsilon must lie inside (0, 1) (density "
                                  f"{density:g}, epsilon {epsilon:g}), as mergekit requires")


class DellaMagpruneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["della"]
    density: float = Field(gt=0, le=1, description="mean probability that an element of the delta is kept")
    epsilon: float = Field(0.15, ge=0, lt=1, description=EPSILON)
    rescale: bool = Field(True, description=RESCALE)
    seed: int = Field(0, ge=0, lt=2**32, description="the draw's seed")

    @model_validator(mode="after")
    def _spread(self) -> DellaMagpruneParams:
        _check_spread(self.density, self.epsilon)
        return self


def keep_probabilities(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per element of `mags` (rows x n, float32), its keep probability from its ascending rank in its row."""
    import torch

    rows, n = mags.shape
    if n == 1:
        return torch.full_like(mags, density)
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=mags.device).expand(rows, n))
    return ranks.float().div_(n - 1).clamp_(0, 1).mul_(2).mul_(epsilon).add_(density - epsilon)


class DellaMagprune(TransformMethod):
    name = "della"
    Params = DellaMagpruneParams
    statistics = (WholeRows, L1Rescale)

    def l1_rescale(self, params: DellaMagpruneParams) -> bool:
        return params.rescale and params.density < 1

    def apply(self, delta, params: DellaMagpruneParams, chunk):
        import torch

        if params.density >= 1:
            return None
        n = delta.numel()
        mags = delta.abs().float().view(n // chunk.row, chunk.row)
        probs = keep_probabilities(mags, params.density, params.epsilon).view(-1).double().mul_(2.0**32)
        keep = torch.lt(uniform32(chunk.key, chunk.start, n, delta.device), probs)
        delta.mul_(keep)
        return int(keep.sum())


class DellaParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["della"]
    density: float = Field(1.0, gt=0, le=1, description="mean probability that an element of each delta is kept")
    epsilon: float = Field(0.15, ge=0, lt=1, description=EPSILON)
    rescale: bool = Field(True, description=RESCALE)
    seed: int = Field(0, ge=0, lt=2**32, description="the draw's seed")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights (the disjoint mean)")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")
    int8_mask: bool = Field(False, description=INT8_MASK)

    @model_validator(mode="after")
    def _spread(self) -> DellaParams:
        _check_spread(self.density, self.epsilon)
        return self


class DellaLinearParams(DellaParams):
    method: Literal["della_linear"]
    normalize: bool = Field(False, description="divide by the sum of the weights (not when within 1e-8 of 0)")


def _pruned(params: DellaParams) -> BaseModel | None:
    if params.density >= 1:
        return None
    return DellaMagpruneParams(method="della", density=params.density, epsilon=params.epsilon,
                               rescale=params.rescale, seed=params.seed)


class Della(MergeMethod):
    name = "della"
    Params = DellaParams

    def default_transform(self, params: DellaParams) -> BaseModel | None:
        return _pruned(params)

    def combine(self, out, deltas, weights, params: DellaParams, chunk):
        elect(out, deltas, weights, params.normalize, params.lambda_, chunk)


class DellaLinear(Della):
    """della's pruning, then a weighted sum in place of the sign election."""

    name = "della_linear"
    Params = DellaLinearParams

    def combine(self, out, deltas, weights, params: DellaLinearParams, chunk):
        weighted_sum(out, deltas, weights, params.normalize, params.lambda_)
