"""Whole rows: nothing read ahead, but every piece and chunk of the tensor holds whole rows, for a transform
that ranks each row as it goes (della's magnitude ranks within a row, as mergekit ranks along dim 1).
A row of a matrix is its last dimension; a vector is one row. Memory: a piece is at least one row."""

from __future__ import annotations

from worker.engine.errors import GraftError
from worker.engine.methods.base import Statistic


class WholeRows(Statistic):
    reads = 0
    whole_rows = True

    @classmethod
    def create(cls, method, params, site, earlier):
        if len(site.shape) > 2:
            raise GraftError("invalid_recipe", f"{getattr(method, 'name', method)}: ranks within rows of matrices "
                             f"and vectors; a tensor of shape {list(site.shape)} has no such rows",
                             {"field": "transform", "shape": list(site.shape)})
        return cls(site, earlier)
