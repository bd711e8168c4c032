"""The statistics passes of a recipe: the reads its methods' declared statistics need before the compute pass
(worker/engine/methods/base.py `Statistic`), scheduled by their order (a statistic reads once those it comes
after are finished), each pass a visitor on the pass runner that reads only the diffs concerned. Deltas are
formed on the CPU in the tensor's compute dtype, chunk by chunk in element order, as the compute pass forms
them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.compute.blocks import Piece, Visit, build_blocks
from worker.engine.compute.merge_kernel import Scratch, chunk_step
from worker.engine.compute.passes import Reading, diff_roles, pair_views, run_pass
from worker.engine.methods.base import Statistic, schedule
from worker.engine.planning.plan import Plan, Segment
from worker.engine.planning.recipe_plan import MergeContext
from worker.engine.storage.safetensors_format import DTYPES

CPU = torch.device("cpu")


class StatisticsVisitor:
    """One read: per tensor, the statistics that read now (with the index of this read among theirs)."""

    def __init__(self, merge: MergeContext, active: dict[str, list[tuple[Statistic, int]]]) -> None:
        self.merge, self.active = merge, active
        self.scratch = Scratch()

    def visit(self, piece: Piece, buffers: list[memoryview], out: memoryview | None) -> None:
        tensor = piece.tensor
        stats = self.active[tensor.name]
        groups: dict[tuple[int, ...], list[tuple[Statistic, int]]] = {}
        for stat, read in stats:
            groups.setdefault(stat.diffs, []).append((stat, read))
        for diffs, members in groups.items():  # one diff's statistics at a time: one diff's histograms in cache
            self._walk(piece, buffers, diffs, members)
        if piece.last:
            for stat, read in stats:
                stat.finish(read)

    def _walk(self, piece: Piece, buffers: list[memoryview], diffs: tuple[int, ...],
              members: list[tuple[Statistic, int]]) -> None:
        """Chunk by chunk in element order, the deltas of `diffs` to the statistics that read them."""
        tensor, uses = piece.tensor, self.merge.uses[piece.tensor.name]
        count = piece.stop - piece.start
        pairs = {k: pair_views(buffers, piece, uses[k].index, count) for k in diffs}
        compute = DTYPES[tensor.compute_dtype]
        step = chunk_step(self.merge.rows.get(tensor.name, 0))
        for i in range(0, count, step):
            m = min(step, count - i)
            lend = self.scratch.lender(m, compute, CPU)
            deltas = {}
            for k, (s, f) in pairs.items():
                delta = lend(f"delta{k}").copy_(f[i:i + m])
                deltas[k] = delta if s is None else delta.sub_(lend("base").copy_(s[i:i + m]))
            for stat, read in members:
                stat.add(read, deltas, piece.start + i, lend)


def _visits(plan: Plan, merge: MergeContext, active: dict[str, list[tuple[Statistic, int]]]) -> list[Visit]:
    """The merged segments of the tensors with a statistic reading now, reading only the diffs they need."""
    visits = []
    for tensor in plan.tensors:
        if tensor.name not in active:
            continue
        uses = merge.uses[tensor.name]
        wanted = sorted({k for stat, _read in active[tensor.name] for k in stat.diffs})
        roles = tuple(r for k in wanted for r in diff_roles(tensor.sources, uses[k].index))
        segments = [Segment("stat", s.start, s.stop) for s in tensor.segments if s.op == "merge"]
        visits.append(Visit(tensor, segments, roles=roles, unit="F32", rows=merge.rows.get(tensor.name, 0)))
    return visits


def statistics_passes(plan: Plan, reading: Reading,
                      on_pass: Callable[[int, int, int, int], None] | None = None) -> int:
    """Gather every statistic of the plan's recipe, pass by pass; returns the bytes read.
    `on_pass(pass, passes, blocks_done, blocks_total)` reports progress."""
    merge: MergeContext | None = plan.merge
    if merge is None:
        return 0
    named = merge.statistics()
    first, passes = schedule([stat for _name, stat in named])
    read = 0
    for index in range(passes):
        active: dict[str, list[tuple[Statistic, int]]] = {}
        for name, stat in named:
            if first[id(stat)] <= index < first[id(stat)] + stat.reads:
                active.setdefault(name, []).append((stat, index - first[id(stat)]))
        for _name, stat in named:
            stat.rewind()
        blocks = build_blocks([(None, _visits(plan, merge, active))], reading.block_bytes, reading.canon)

        def on_block(totals, index=index, blocks=blocks) -> None:
            if on_pass is not None:
                on_pass(index, passes, totals.blocks_done, len(blocks))

        totals = run_pass(blocks, reading, StatisticsVisitor(merge, active), on_block=on_block)
        read += totals.bytes_read
    return read
