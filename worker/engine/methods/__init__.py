"""Merge methods and diff transforms: one module each, registered here and nowhere else.

A *transform* rewrites one diff (`finetuned - base`) of one tensor: it may keep a window of magnitude ranks
or drop elements at random by a counter-based hash. A *merge* combines the (transformed, weighted) diffs of
one tensor into the delta added to the target. Each module declares its parameters as a pydantic model whose
`method` field names it; the recipe schema, the API's OpenAPI and the CLI's help are built from these models.
A method that needs whole-tensor statistics before the compute pass (a magnitude threshold, a norm, a
selection) names their kinds in its class's `statistics` (worker/engine/methods/statistics/); the pass
runner reads the inputs as often as they need.

Adding a method: write its module, import it below and add it to TRANSFORMS or MERGES (and, for a statistic
no method has needed yet, write its module under statistics/).
"""

from __future__ import annotations

from worker.engine.methods.base import MergeMethod, TransformMethod
from worker.engine.methods.breadcrumbs import Breadcrumbs
from worker.engine.methods.dare import Dare
from worker.engine.methods.dare_ties import DareTies
from worker.engine.methods.della import Della, DellaLinear, DellaMagprune
from worker.engine.methods.magnitude import Magnitude
from worker.engine.methods.sce import Sce
from worker.engine.methods.sum import Sum
from worker.engine.methods.ties import Ties

TRANSFORMS: dict[str, TransformMethod] = {m.name: m for m in (Magnitude(), Dare(), Breadcrumbs(), DellaMagprune())}
MERGES: dict[str, MergeMethod] = {m.name: m for m in (Sum(), Ties(), DareTies(), Della(), DellaLinear(), Sce())}

__all__ = ["MERGES", "TRANSFORMS", "MergeMethod", "TransformMethod"]
