"""The graft's compute pass: a visitor on the pass runner (passes.py) that computes each piece of the output
and hands finished blocks to a writer thread, so that hashing and I/O overlap the compute.

A merged tensor that is the plain transfer (one diff, a plain sum, no transform: MergeContext.plain_alpha)
runs on the plain kernel at alpha = weight * lambda, the bytes and the speed of the plain path; other merged
tensors on the merge kernel (merge_kernel.py)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.compute.arithmetic import Arithmetic
from worker.engine.compute.blocks import Piece, build_blocks, graft_groups, graft_roles
from worker.engine.compute.merge_kernel import MergeKernel, MergePiece
from worker.engine.compute.passes import PassTotals, Reading, pair_views, run_pass, view_of
from worker.engine.compute.patches import Patch, PatchSource
from worker.engine.compute.tensor_stats import TensorStats
from worker.engine.errors import GraftError
from worker.engine.planning.options import delta_role
from worker.engine.planning.plan import Plan, Shard
from worker.engine.planning.recipe_plan import MergeContext
from worker.engine.storage.buffers import BufferPool
from worker.engine.storage.safetensors_format import DTYPES, itemsize
from worker.engine.storage.sinks import FileRecord, Sink

StreamTotals = PassTotals  # what the compute pass reports (read, written, where the time went)


class _Writer(threading.Thread):
    """Writes blocks in order on its own thread so hashing and I/O overlap the compute."""

    def __init__(self, sink: Sink, plan: Plan, pool: BufferPool) -> None:
        super().__init__(name="graft-writer", daemon=True)
        self.sink, self.plan, self.pool = sink, plan, pool
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.records: list[FileRecord] = []
        self.error: BaseException | None = None
        self.bytes_written = 0

    def run(self) -> None:
        writer = None
        try:
            while True:
                item = self.q.get()
                if item is None:
                    if writer is not None:  # stopped mid-shard (the stream failed or was cancelled)
                        writer.abort()
                    return
                if self.error is not None:
                    continue
                block, buf = item
                if block.header is not None:
                    shard: Shard = self.plan.shards[block.shard]
                    writer = self.sink.open(shard.file, len(block.header) + shard.data_bytes)
                    writer.write(block.header)
                if len(buf):
                    writer.write(buf)
                    self.bytes_written += len(buf)
                self.pool.give(buf)
                if block.closes_shard:
                    self.records.append(writer.close())
                    writer = None
        except BaseException as exc:  # surfaced to the compute thread
            self.error = exc
            if writer is not None:
                writer.abort()
            while self.q.get() is not None:
                pass

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)


class ComputeVisitor:
    """Computes each output piece; per tensor, its sums (the manifest's) and the buffers a fine-tune changed."""

    def __init__(self, plan: Plan, alpha: float, device: torch.device,
                 patches: dict[str, PatchSource] | None = None) -> None:
        self.alpha, self.merge = alpha, plan.merge
        self.patches = patches or {}  # delta role -> the store that keeps its structure (structured_reads)
        self.arithmetic = Arithmetic(device)
        self.kernel = MergeKernel(plan.merge, device, self.arithmetic.whole_pieces) if plan.merge else None
        self.stats: dict[str, TensorStats] = {t.name: TensorStats() for t in plan.tensors}
        self.changed_buffers: list[dict] = []

    def visit(self, piece: Piece, buffers: list[memoryview], out: memoryview | None) -> None:
        tensor = piece.tensor
        count = piece.stop - piece.start
        out_t = torch.frombuffer(out, dtype=DTYPES[tensor.dtype], count=count, offset=piece.out_offset)
        src = tensor.sources
        compute = DTYPES[tensor.compute_dtype]
        if piece.op == "merge":
            self._merge(piece, buffers, out_t, compute)
        elif piece.op == "transfer":
            t, s, f = (view_of(buffers, piece.reads[r], src[r].dtype, count)
                       for r in ("target_base", "source_base", "source_finetuned"))
            self.arithmetic.transfer(out_t, t, s, f, self.alpha, compute, self.stats[tensor.name])
        else:
            self._copy(piece, buffers, out, out_t)

    def _merge(self, piece: Piece, buffers: list[memoryview], out_t: torch.Tensor, compute: torch.dtype) -> None:
        tensor, count, merge = piece.tensor, piece.stop - piece.start, self.merge
        src, uses = tensor.sources, merge.uses[tensor.name]
        target = view_of(buffers, piece.reads["target_base"], src["target_base"].dtype, count)
        pairs = [pair_views(buffers, piece, u.index, count) for u in uses]
        alpha = merge.plain_alpha(tensor.name)
        if alpha is not None:  # the plain transfer: its kernel, its bytes
            (s, f), = pairs
            if s is None:  # a diff artifact's delta: the same arithmetic from the delta on
                patch = self._patch(piece, uses[0].index)
                if patch is not None:
                    self.arithmetic.apply_patch(out_t, target, patch, alpha, compute, self.stats[tensor.name])
                else:
                    self.arithmetic.apply_delta(out_t, target, f, alpha, compute, self.stats[tensor.name])
            else:
                self.arithmetic.transfer(out_t, target, s, f, alpha, compute, self.stats[tensor.name])
            uses[0].seen += count
            uses[0].kept += count
            return
        self.kernel.piece(MergePiece(tensor.name, out_t, target, pairs, piece.start, compute,
                                     self.stats[tensor.name]))

    def _patch(self, piece: Piece, index: int) -> Patch | None:
        role = delta_role(index)
        store = self.patches.get(role)
        if store is None:
            return None
        info, size = piece.tensor.sources[role], itemsize(piece.tensor.sources[role].dtype)
        return store.take_patch(info.file, info.start + piece.start * size, info.start + piece.stop * size)

    def _copy(self, piece: Piece, buffers: list[memoryview], out: memoryview, out_t: torch.Tensor) -> None:
        tensor, count, src = piece.tensor, piece.stop - piece.start, piece.tensor.sources
        role = graft_roles(tensor, piece.op)[0]
        info = src[role]
        is_float = tensor.dtype in ("F64", "F32", "F16", "BF16")
        if info.dtype == tensor.dtype and not is_float:
            idx, offset = piece.reads[role]
            n = count * itemsize(info.dtype)
            out[piece.out_offset:piece.out_offset + n] = buffers[idx][offset:offset + n]
        else:
            self.arithmetic.copy(out_t, view_of(buffers, piece.reads[role], info.dtype, count), is_float,
                                 self.stats[tensor.name])
        if tensor.check_sources_equal:
            s = view_of(buffers, piece.reads["source_base"], src["source_base"].dtype, count)
            f = view_of(buffers, piece.reads["source_finetuned"], src["source_finetuned"].dtype, count)
            if not torch.equal(s, f):
                self.changed_buffers.append({
                    "code": "buffer_changed_by_finetune", "tensor": tensor.name,
                    "message": f"{tensor.name} is not a float tensor and differs between the sources; the "
                               "target's value was kept"})


@dataclass
class StreamResult:
    records: list[FileRecord]
    stats: dict[str, TensorStats]
    changed_buffers: list[dict]
    totals: PassTotals


def structured_reads(plan: Plan, reading: Reading) -> dict[str, PatchSource]:
    """The diff artifacts' stores (by delta role) told which delta files the plain kernel applies, so that
    their reads keep the delta's structure (compute/patches.py): those of the plain transfers."""
    merge: MergeContext | None = plan.merge
    files: dict[str, set[str]] = {}
    for tensor in plan.tensors if merge is not None else ():
        uses = merge.uses.get(tensor.name)
        if uses and merge.plain_alpha(tensor.name) is not None and delta_role(uses[0].index) in tensor.sources:
            role = delta_role(uses[0].index)
            files.setdefault(role, set()).add(tensor.sources[role].file)
    out = {}
    for role, names in files.items():
        store = reading.stores.get((reading.canon or {}).get(role, role))
        if isinstance(store, PatchSource):
            store.keep_structure(names)
            out[role] = store
    return out


def stream_plan(plan: Plan, sink: Sink, reading: Reading, *, alpha: float,
                on_block: Callable[[PassTotals], None] | None = None) -> StreamResult:
    """The compute pass of a plan (a recipe's statistics already gathered): every shard written to `sink`."""
    merge: MergeContext | None = plan.merge
    blocks = build_blocks(graft_groups(plan, merge.rows if merge is not None else None), reading.block_bytes,
                          reading.canon)
    for _name, stat in merge.statistics() if merge is not None else ():
        stat.rewind()
    patches = structured_reads(plan, reading)
    visitor = ComputeVisitor(plan, alpha, reading.device, patches)
    pool = BufferPool()
    writer = _Writer(sink, plan, pool)
    writer.start()
    try:
        totals = run_pass(blocks, reading, visitor, output=writer, on_block=on_block)
        writer.put(None)
        t0 = time.perf_counter()
        writer.join()
        totals.wait_write_s += time.perf_counter() - t0
        if writer.error is not None:
            raise writer.error
    except BaseException:
        if writer.is_alive():
            writer.error = writer.error or GraftError("aborted", "stream aborted")
            writer.q.put(None)
            writer.join()
        raise
    finally:
        for store in patches.values():
            store.keep_structure(set())
    return StreamResult(writer.records, visitor.stats, visitor.changed_buffers, totals)
