"""Level weights: one streaming pass over the inputs, under the engine's memory bound, that measures how far
the target moved from each source base, relative to the target and to the fine-tune's delta.

Only what a graft would transfer is read (the elements that take a diff), each input byte once, through the
graft's own block builder and read-ahead (worker/engine/compute/stream.py): roles naming one model share reads, and
a recipe's diffs are read in the same pass as the target they share. Sums are kept per tensor and per diff
in float64 (each chunk's dot in the compute dtype, as the graft's statistics do):

    target_sq = ||t||^2, delta_sq = ||f - s||^2, bases_sq = ||t - s||^2, cross = <t - s, f - s>
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.compute.arithmetic import CHUNK
from worker.engine.compute.stream import BlockReader, build_blocks, one_compute_thread, view_of
from worker.engine.errors import GraftCancelled
from worker.engine.planning.options import base_role, finetuned_role
from worker.engine.planning.plan import OutputTensor, Plan, Segment, Shard
from worker.engine.planning.recipe import LAYER_INDEX
from worker.engine.storage.buffers import BufferPool
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import ARITHMETIC_FLOATS, DTYPES
from worker.engine.storage.stores import Store

RATIOS = ("bases_distance_ratio", "delta_ratio", "bases_to_delta_ratio", "cos_bases_delta")


@dataclass
class Sums:
    target_sq: float = 0.0
    delta_sq: float = 0.0
    bases_sq: float = 0.0
    cross: float = 0.0
    elements: int = 0

    def add(self, other: Sums) -> None:
        self.target_sq += other.target_sq
        self.delta_sq += other.delta_sq
        self.bases_sq += other.bases_sq
        self.cross += other.cross
        self.elements += other.elements

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.target_sq, self.delta_sq, self.bases_sq, self.cross))

    def to_dict(self) -> dict:
        """Norms and the four ratios; a ratio whose denominator is zero (or any non-finite sum) is None."""
        if not self.finite:
            return {"elements": self.elements, "nonfinite": True, **dict.fromkeys(
                ("target_norm", "delta_norm", "bases_norm", *RATIOS))}
        t, d, b = math.sqrt(self.target_sq), math.sqrt(self.delta_sq), math.sqrt(self.bases_sq)
        return {"elements": self.elements, "target_norm": t, "delta_norm": d, "bases_norm": b,
                "bases_distance_ratio": b / t if t else None, "delta_ratio": d / t if t else None,
                "bases_to_delta_ratio": b / d if d else None,
                "cos_bases_delta": self.cross / (b * d) if b and d else None}


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


def stat_plan(plan: Plan) -> Plan:
    """The part of a graft's plan that takes a diff, as one pseudo-shard of `stat` segments: every input
    each segment names is read, nothing else (copied tensors and a fine-tune's extra rows are skipped)."""
    pseudo = []
    for t in plan.tensors:
        segments = [Segment("stat", s.start, s.stop) for s in t.segments if s.op in ("transfer", "merge")]
        if segments and diff_pairs(plan, t.name):
            # The output dtype as the pseudo tensor's: blocks then hold what a graft's blocks hold.
            pseudo.append(OutputTensor(t.name, t.dtype, t.shape, "stat", segments, dict(t.sources),
                                       t.compute_dtype))
    return Plan(pseudo, [Shard("inspect", pseudo)], [], [], {}, False, {})


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
              sums: list[Sums]) -> None:
        t_buf, s_buf, d_buf = self.buffers(compute)
        n = t.numel()
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            m = j - i
            tb, sb, db = t_buf[:m], s_buf[:m], d_buf[:m]
            tb.copy_(t[i:j])
            tsq = float(torch.dot(tb, tb))
            for (s, f), acc in zip(pairs, sums, strict=True):
                sb.copy_(s[i:j])
                db.copy_(f[i:j])
                db.sub_(sb)  # the delta f - s
                sb.sub_(tb)  # s - t: the bases' distance, negated
                acc.target_sq += tsq
                acc.delta_sq += float(torch.dot(db, db))
                acc.bases_sq += float(torch.dot(sb, sb))
                acc.cross -= float(torch.dot(sb, db))
                acc.elements += m


@dataclass
class PassTotals:
    bytes_total: int = 0
    bytes_read: int = 0
    tensors_total: int = 0
    tensors_done: int = 0
    seconds: float = 0.0
    wait_read_s: float = 0.0
    compute_s: float = 0.0


def weights_pass(plan: Plan, stores: dict[str, Store], canon: dict[str, str], *, block_bytes: int,
                 prefetch: int, io_threads: int, should_cancel: Callable[[], bool] | None = None,
                 on_block: Callable[[PassTotals], None] | None = None,
                 ) -> tuple[dict[str, dict[int, Sums]], PassTotals]:
    """Per output tensor, per diff index: the sums over the elements that take that diff."""
    splan = stat_plan(plan)
    blocks = build_blocks(splan, block_bytes, canon)
    totals = PassTotals(bytes_total=sum(r[3] for b in blocks for r in b.reads), tensors_total=len(splan.tensors))
    sums = {t.name: {i: Sums() for i, _b, _f in diff_pairs(plan, t.name)} for t in splan.tensors}
    acc = _Accumulator()
    pool = BufferPool()
    started = time.perf_counter()
    threads = one_compute_thread(torch.device("cpu"))
    try:
        with BlockReader(blocks, stores, pool, io_threads, prefetch) as reader:
            for block, buffers, waited in reader:
                if should_cancel is not None and should_cancel():
                    raise GraftCancelled()
                t0 = time.perf_counter()
                totals.bytes_read += sum(len(b) for b in buffers)
                for piece in block.pieces:
                    _piece_sums(plan, piece, buffers, acc, sums)
                    totals.tensors_done += piece.last
                for view in buffers:
                    pool.give(view)
                totals.wait_read_s += waited
                totals.compute_s += time.perf_counter() - t0
                if on_block is not None:
                    on_block(totals)
    finally:
        torch.set_num_threads(threads)
    totals.seconds = time.perf_counter() - started
    return sums, totals


def _piece_sums(plan: Plan, piece, buffers: list[memoryview], acc: _Accumulator,
                sums: dict[str, dict[int, Sums]]) -> None:
    tensor = piece.tensor
    count = piece.stop - piece.start
    src = tensor.sources
    t = view_of(buffers, piece.reads["target_base"], src["target_base"].dtype, count)
    pairs, slots = [], []
    for index, b_role, f_role in diff_pairs(plan, tensor.name):
        pairs.append((view_of(buffers, piece.reads[b_role], src[b_role].dtype, count),
                      view_of(buffers, piece.reads[f_role], src[f_role].dtype, count)))
        slots.append(sums[tensor.name][index])
    acc.piece(t, pairs, DTYPES[tensor.compute_dtype], slots)


# --- summaries ------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _medians(rows: list[tuple[OutputTensor, Sums]]) -> dict:
    """As the graft's manifest does (run._connectivity): medians of per-matrix ratios over the transferred
    tensors of two or more dimensions whose target and delta are non-zero (a norm pooled over the model is
    dominated by whichever tensors carry the most mass)."""
    kept = [s for t, s in rows if len(t.shape) >= 2 and s.finite and s.target_sq and s.delta_sq]
    ratios = [s.to_dict() for s in kept]
    out = {name: _median([r[name] for r in ratios if r[name] is not None]) for name in RATIOS}
    out["tensors"] = len(kept)
    return out


def target_parameters(target: ResolvedModel) -> int:
    """The target's float parameters (a tied head counts once: it is the embedding)."""
    return sum(i.numel for i in target.tensors.values() if i.dtype in ARITHMETIC_FLOATS)


def summarize(plan: Plan, sums: dict[str, dict[int, Sums]], diffs: int, target: ResolvedModel) -> list[dict]:
    """Per diff: every tensor's figures, pooled per layer, the medians, and the coverage."""
    by_name = {t.name: t for t in plan.tensors}
    total = target_parameters(target)
    out = []
    for index in range(diffs):
        rows = [(by_name[name], per[index]) for name, per in sums.items() if index in per]
        layers: dict[int | None, Sums] = {}
        counts: dict[int | None, int] = {}
        tensors = []
        for tensor, s in rows:
            layer = layer_of(tensor.name)
            layers.setdefault(layer, Sums()).add(s)
            counts[layer] = counts.get(layer, 0) + 1
            tensors.append({"name": tensor.name, "layer": layer, "shape": list(tensor.shape), **s.to_dict()})
        order = sorted(layers, key=lambda k: (k is None, k or 0))
        covered = sum(s.elements for t, s in rows if t.name in target.tensors)
        out.append({
            "diff": index,
            "medians": _medians(rows),
            "coverage": {"share": covered / total if total else None, "covered_parameters": covered,
                         "target_parameters": total},
            "layers": [{"layer": k, "tensors": counts[k], **layers[k].to_dict()} for k in order],
            "tensors": tensors,
            "unchanged_tensors": sum(1 for _t, s in rows if s.finite and not s.delta_sq),
            "nonfinite_tensors": [t.name for t, s in rows if not s.finite],
        })
    return out


NAMED_IN_MESSAGES = 10  # tensors a reason's message names at most (the full table is in the report)


def nonfinite_reason_names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMED_IN_MESSAGES])
    return shown + (f" and {len(names) - NAMED_IN_MESSAGES} more" if len(names) > NAMED_IN_MESSAGES else "")


__all__ = ["Sums", "diff_pairs", "layer_of", "stat_plan", "summarize", "weights_pass"]
