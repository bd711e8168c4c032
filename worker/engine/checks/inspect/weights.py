"""Level weights: one streaming pass over the inputs, under the engine's memory bound, that measures how far
the target moved from each source base, relative to the target and to the fine-tune's delta.

Only what a graft would transfer is read (the elements that take a diff), each input byte once: a visitor on
the engine's pass runner (worker/engine/compute/passes.py), with the graft's block builder and read-ahead, so
roles naming one model share reads and a recipe's diffs are read in the same pass as the target they share.
Sums are kept per tensor and per diff (worker/engine/compute/tensor_stats.py, as the graft's manifest keeps
them: each chunk's dot in the compute dtype, summed in float64):

    target_sq = ||t||^2, delta_sq = ||f - s||^2, bases_sq = ||t - s||^2, cross = <t - s, f - s>
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.compute.arithmetic import CHUNK
from worker.engine.compute.blocks import Piece, Visit, build_blocks, graft_roles
from worker.engine.compute.passes import PassTotals, Reading, run_pass, view_of
from worker.engine.compute.tensor_stats import TensorStats, chunk_sums, connectivity_medians
from worker.engine.diffs.artifact import read_sketch
from worker.engine.diffs.sketch import Sketcher, estimates
from worker.engine.planning.options import base_role, delta_role, finetuned_role
from worker.engine.planning.plan import Plan, Segment
from worker.engine.planning.recipe import LAYER_INDEX
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import ARITHMETIC_FLOATS, DTYPES
from worker.engine.storage.stores import Store


def layer_of(name: str) -> int | None:
    """The layer index in a tensor's name (`model.layers.N.`, `h.N.`, ...: the recipes' convention); None for
    the embeddings, final norm and head."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def diff_pairs(plan: Plan, name: str) -> list[tuple[int, str, str]]:
    """(diff index, base role, fine-tune role) of each diff that one output tensor takes."""
    if plan.merge is None:
        return [(0, "source_base", "source_finetuned")]
    return [(u.index, base_role(u.index), finetuned_role(u.index)) for u in plan.merge.uses.get(name, [])]


def weights_visits(plan: Plan) -> list[Visit]:
    """The part of a graft's plan that takes a diff: every input each such segment names is read, nothing else
    (copied tensors and a fine-tune's extra rows are skipped; a diff artifact's delta is not decoded: its
    sketch and sums stand in). Blocks count the output's dtype: they hold what a graft's blocks hold."""
    visits = []
    for t in plan.tensors:
        segments = [Segment("stat", s.start, s.stop) for s in t.segments if s.op in ("transfer", "merge")]
        if segments and diff_pairs(plan, t.name):
            roles = tuple(r for r in graft_roles(t, "merge") if not r.startswith("delta."))
            visits.append(Visit(t, segments, roles=roles))
    return visits


class _Accumulator:
    """Chunked sums over one piece; scratch reused across pieces (one compute thread)."""

    def __init__(self) -> None:
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    def buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        bufs = self._scratch.get(dtype)
        if bufs is None:
            bufs = self._scratch[dtype] = tuple(torch.empty(CHUNK, dtype=dtype) for _ in range(3))
        return bufs

    def piece(self, t: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]], compute: torch.dtype,
              sums: list[TensorStats]) -> None:
        t_buf, s_buf, d_buf = self.buffers(compute)
        n = t.numel()
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            m = j - i
            tb, sb, db = t_buf[:m], s_buf[:m], d_buf[:m]
            tb.copy_(t[i:j])
            for (s, f), acc in zip(pairs, sums, strict=True):
                sb.copy_(s[i:j])
                db.copy_(f[i:j])
                db.sub_(sb)  # the delta f - s
                sb.sub_(tb)  # s - t: the bases' distance, negated
                acc.add_chunk(chunk_sums(tb, db, sb), m)


class _WeightsVisitor:
    def __init__(self, plan: Plan, sums: dict[str, dict[int, TensorStats]]) -> None:
        self.plan, self.sums, self.acc = plan, sums, _Accumulator()
        self.target_sketches: dict[str, Sketcher] = {}  # tensors a diff artifact takes: the target's sketch

    def visit(self, piece: Piece, buffers: list[memoryview], out: memoryview | None) -> None:
        tensor = piece.tensor
        count = piece.stop - piece.start
        src = tensor.sources
        t = view_of(buffers, piece.reads["target_base"], src["target_base"].dtype, count)
        pairs, slots, stored = [], [], []
        for index, b_role, f_role in diff_pairs(self.plan, tensor.name):
            if delta_role(index) in src:
                stored.append(self.sums[tensor.name][index])
                continue
            pairs.append((view_of(buffers, piece.reads[b_role], src[b_role].dtype, count),
                          view_of(buffers, piece.reads[f_role], src[f_role].dtype, count)))
            slots.append(self.sums[tensor.name][index])
        self.acc.piece(t, pairs, DTYPES[tensor.compute_dtype], slots)
        if stored:
            tc = t.to(DTYPES[tensor.compute_dtype])
            sketcher = self.target_sketches.get(tensor.name)
            if sketcher is None:
                numel = src[next(r for r in src if r.startswith("delta."))].numel
                sketcher = self.target_sketches[tensor.name] = Sketcher(tensor.name, numel)
            sketcher.add(piece.start, tc)
            target_sq = float(torch.dot(tc, tc))
            for slot in stored:
                slot.target_sq += target_sq
                slot.elements += count


def weights_pass(plan: Plan, stores: dict[str, Store], canon: dict[str, str], *, block_bytes: int,
                 prefetch: int, io_threads: int, should_cancel: Callable[[], bool] | None = None,
                 on_block: Callable[[PassTotals], None] | None = None,
                 ) -> tuple[dict[str, dict[int, TensorStats]], PassTotals]:
    """Per output tensor, per diff index: the sums over the elements that take that diff."""
    visits = weights_visits(plan)
    blocks = build_blocks([(None, visits)], block_bytes, canon)
    totals = PassTotals(tensors_total=len(visits))
    sums = {v.tensor.name: {i: TensorStats() for i, _b, _f in diff_pairs(plan, v.tensor.name)} for v in visits}
    reading = Reading(stores, canon, torch.device("cpu"), block_bytes, prefetch, io_threads, should_cancel)
    visitor = _WeightsVisitor(plan, sums)
    run_pass(blocks, reading, visitor, on_block=on_block, totals=totals)
    _from_sketches(plan, stores, sums, visitor.target_sketches)
    return sums, totals


def _from_sketches(plan: Plan, stores: dict[str, Store], sums: dict[str, dict[int, TensorStats]],
                   targets: dict[str, Sketcher]) -> None:
    """A diff artifact's sums: ||d||^2 as extracted, ||t - s||^2 and <t - s, d> estimated from the target's sketch
    and the artifact's (worker/engine/diffs/sketch.py), each with the half-width of its stated bound. A tensor
    whose transferred elements are not the sketched ones (a target with fewer vocabulary rows) has none."""
    for name, per in sums.items():
        tensor = next(t for t in plan.tensors if t.name == name) if name in targets else None
        for index, stats in per.items():
            role = delta_role(index)
            if tensor is None or role not in tensor.sources:
                continue
            figures = read_sketch(stores[role], name)
            span = sum(s.stop - s.start for s in tensor.segments if s.op == "merge")
            if figures is None or span != tensor.sources[role].numel:
                stats.sketch = None
                continue
            base, delta, delta_sq = figures
            est = estimates(targets[name].sketch, base, delta, span, delta_sq)
            stats.delta_sq, stats.bases_sq, stats.cross = delta_sq, max(0.0, est["bases_sq"]), est["cross"]
            stats.sketch = {"bases_sq_bound": est["bases_sq_bound"], "cross_bound": est["cross_bound"]}


# --- summaries ------------------------------------------------------------------------------------------

def target_parameters(target: ResolvedModel) -> int:
    """The target's float parameters (a tied head counts once: it is the embedding)."""
    return sum(i.numel for i in target.tensors.values() if i.dtype in ARITHMETIC_FLOATS)


def summarize(plan: Plan, sums: dict[str, dict[int, TensorStats]], diffs: int, target: ResolvedModel
              ) -> list[dict]:
    """Per diff: every tensor's figures, pooled per layer, the medians, and the coverage."""
    by_name = {t.name: t for t in plan.tensors}
    total = target_parameters(target)
    out = []
    for index in range(diffs):
        rows = [(by_name[name], per[index]) for name, per in sums.items() if index in per]
        layers: dict[int | None, TensorStats] = {}
        counts: dict[int | None, int] = {}
        tensors = []
        for tensor, s in rows:
            layer = layer_of(tensor.name)
            layers.setdefault(layer, TensorStats()).add(s)
            counts[layer] = counts.get(layer, 0) + 1
            tensors.append({"name": tensor.name, "layer": layer, "shape": list(tensor.shape), **s.report()})
        order = sorted(layers, key=lambda k: (k is None, k or 0))
        covered = sum(s.elements for t, s in rows if t.name in target.tensors)
        out.append({
            "diff": index,
            "medians": connectivity_medians([(t.shape, s) for t, s in rows]),
            "coverage": {"share": covered / total if total else None, "covered_parameters": covered,
                         "target_parameters": total},
            "layers": [{"layer": k, "tensors": counts[k], **layers[k].report()} for k in order],
            "tensors": tensors,
            "unchanged_tensors": sum(1 for _t, s in rows if s.finite and not s.delta_sq),
            "nonfinite_tensors": [t.name for t, s in rows if not s.finite],
        })
    return out


NAMED_IN_MESSAGES = 10  # tensors a reason's message names at most (the full table is in the report)


def nonfinite_reason_names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMED_IN_MESSAGES])
    return shown + (f" and {len(names) - NAMED_IN_MESSAGES} more" if len(names) > NAMED_IN_MESSAGES else "")


__all__ = ["diff_pairs", "layer_of", "summarize", "weights_pass", "weights_visits"]
