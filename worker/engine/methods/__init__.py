"""Merge methods and diff transforms: one module each, registered here and nowhere else.

A *transform* rewrites one diff (`finetuned - base`) of one tensor: it may keep a window of magnitude ranks
(found exactly by a statistics pass, see worker/engine/compute/rank_select.py) or drop elements at random by a
counter-based hash. A *merge* combines the (transformed, weighted) diffs of one tensor into the delta added
to the target. Each module declares its parameters as a pydantic model whose `method` field names it; the
recipe schema, the API's OpenAPI and the CLI's help are built from these models.

Adding a method: write its module, import it below and add it to TRANSFORMS or MERGES.
"""

from __future__ import annotations

from worker.engine.methods.base import MergeMethod, TransformMethod
from worker.engine.methods.breadcrumbs import Breadcrumbs
from worker.engine.methods.dare import Dare
from worker.engine.methods.dare_ties import DareTies
from worker.engine.methods.magnitude import Magnitude
from worker.engine.methods.sum import Sum
from worker.engine.methods.ties import Ties

TRANSFORMS: dict[str, TransformMethod] = {m.name: m for m in (Magnitude(), Dare(), Breadcrumbs())}
MERGES: dict[str, MergeMethod] = {m.name: m for m in (Sum(), Ties(), DareTies())}

__all__ = ["MERGES", "TRANSFORMS", "MergeMethod", "TransformMethod"]
