"""Streaming a plan: cut it into bounded blocks, read each block's input ranges ahead of time on a
thread pool (adjacent ranges coalesced into one request), compute, and hand finished bytes to a writer
thread. Memory is bounded by block size times the read-ahead depth, never by the model size."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from worker.engine.compute.arithmetic import CHUNK, Arithmetic, TensorStats
from worker.engine.compute.rank_select import RankSelect
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.methods.base import magnitude_bits
from worker.engine.planning.options import base_role, finetuned_role
from worker.engine.planning.plan import OutputTensor, Plan, Segment, Shard
from worker.engine.planning.recipe_plan import MergeContext, Scratch, merge_chunks
from worker.engine.storage.buffers import BufferPool
from worker.engine.storage.safetensors_format import DTYPES, build_header, itemsize
from worker.engine.storage.sinks import FileRecord, Sink
from worker.engine.storage.stores import Store

COALESCE_GAP = 256 << 10  # read through gaps this small rather than issue another request
_ROLES_FOR_OP = {"transfer": ("target_base", "source_base", "source_finetuned"), "target": ("target_base",),
                 "finetuned": ("source_finetuned",)}


@dataclass
class Piece:
    tensor: OutputTensor
    op: str
    start: int  # element range of the output tensor
    stop: int
    out_offset: int  # byte offset in the block's output buffer
    reads: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (read index, byte offset)
    last: bool = False  # the tensor's final piece


@dataclass
class Block:
    shard: int
    pieces: list[Piece]
    out_bytes: int
    reads: list[tuple[str, str, int, int]] = field(default_factory=list)  # (role, file, start, length)
    header: bytes | None = None  # set on a shard's first block
    closes_shard: bool = False


def _roles(tensor: OutputTensor, op: str) -> tuple[str, ...]:
    if op == "target" and tensor.check_sources_equal:
        return ("target_base", "source_base", "source_finetuned")
    if op in ("merge", "stat"):  # a recipe's segment (or its statistics): every input it names
        return tuple(tensor.sources)
    if op.startswith("finetuned."):  # a recipe's extra vocabulary rows, from one diff's fine-tune
        return (finetuned_role(int(op.partition(".")[2])),)
    return _ROLES_FOR_OP[op]


def _coalesce(block: Block, wanted: list[tuple[Piece, str, str, int, int]], canon: dict[str, str] | None = None
              ) -> None:
    """Group the pieces' reads into as few ranged requests as the gaps allow. Roles naming the same model
    (`canon`: role -> the role whose store is read) share their requests."""
    by_file: dict[tuple[str, str], list] = {}
    for item in wanted:
        by_file.setdefault(((canon or {}).get(item[1], item[1]), item[2]), []).append(item)
    for (role, file), items in by_file.items():
        items.sort(key=lambda it: it[3])
        runs: list[list] = []  # [start, end, members]
        for item in items:
            start, length = item[3], item[4]
            if runs and start - runs[-1][1] <= COALESCE_GAP:
                runs[-1][1] = max(runs[-1][1], start + length)
                runs[-1][2].append(item)
            else:
                runs.append([start, start + length, [item]])
        for run_start, run_end, members in runs:
            idx = len(block.reads)
            block.reads.append((role, file, run_start, run_end - run_start))
            for piece, r, _f, start, _n in members:
                piece.reads[r] = (idx, start - run_start)


def build_blocks(plan: Plan, block_bytes: int, canon: dict[str, str] | None = None) -> list[Block]:
    blocks: list[Block] = []
    for shard_index, shard in enumerate(plan.shards):
        header, _ = build_header([(t.name, t.dtype, t.shape) for t in shard.tensors], {"format": "pt"})
        current: Block | None = None
        wanted: list = []

        def close() -> None:
            nonlocal current, wanted
            if current is not None:
                _coalesce(current, wanted, canon)
                blocks.append(current)
            current, wanted = None, []

        first = True
        for tensor in shard.tensors:
            out_size = itemsize(tensor.dtype)
            widest = max([out_size] + [itemsize(i.dtype) for i in tensor.sources.values()])
            step = max(1, block_bytes // widest)
            ops = [seg for seg in tensor.segments if seg.stop > seg.start]
            if not ops:  # empty tensor: still listed in the header, no data
                continue
            for seg_index, seg in enumerate(ops):
                for start in range(seg.start, seg.stop, step):
                    stop = min(seg.stop, start + step)
                    nbytes = (stop - start) * out_size
                    if current is not None and current.out_bytes + nbytes > block_bytes:
                        close()
                    if current is None:
                        current = Block(shard_index, [], 0, header=header if first else None)
                        first = False
                    piece = Piece(tensor, seg.op, start, stop, current.out_bytes,
                                  last=seg_index == len(ops) - 1 and stop == seg.stop)
                    current.pieces.append(piece)
                    current.out_bytes += nbytes
                    for role in _roles(tensor, seg.op):
                        info = tensor.sources[role]
                        size = itemsize(info.dtype)
                        wanted.append((piece, role, info.file, info.start + start * size, (stop - start) * size))
        close()
        if first:  # a shard of empty tensors only
            blocks.append(Block(shard_index, [], 0, header=header))
        blocks[-1].closes_shard = True
    return blocks


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


@dataclass
class StreamTotals:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_done: int = 0
    # Where the compute thread's time went: a well-fed pipeline spends it computing.
    wait_read_s: float = 0.0
    compute_s: float = 0.0
    wait_write_s: float = 0.0


class BlockReader:
    """Reads each block's input ranges ahead of the compute on a thread pool, into pooled buffers, and hands
    the blocks over in order. Closing it cancels what is still pending."""

    def __init__(self, blocks: list[Block], stores: dict[str, Store], buffers: BufferPool, io_threads: int,
                 prefetch: int) -> None:
        self.blocks, self.stores, self.buffers, self.prefetch = blocks, stores, buffers, prefetch
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="graft-read")
        # Stores that fetch ahead learn the whole order of the reads now (each store once: roles may share one).
        expected: dict[int, tuple[Store, list[tuple[str, int, int]]]] = {}
        for block in blocks:
            for role, file, start, length in block.reads:
                expected.setdefault(id(stores[role]), (stores[role], []))[1].append((file, start, length))
        for store, reads in expected.values():
            store.expect(reads)
        self.window: deque[list[tuple[memoryview, Future]]] = deque()
        self.submitted = 0

    def _submit(self, index: int) -> list[tuple[memoryview, Future]]:
        reads = []
        for role, file, start, length in self.blocks[index].reads:
            view = self.buffers.take(length)
            reads.append((view, self.pool.submit(self.stores[role].stream_into, file, start, view)))
        return reads

    def __iter__(self) -> Iterator[tuple[Block, list[memoryview], float]]:
        """(block, its read buffers, seconds waited for them); give the buffers back when done."""
        for index, block in enumerate(self.blocks):
            while self.submitted < len(self.blocks) and self.submitted <= index + self.prefetch:
                self.window.append(self._submit(self.submitted))
                self.submitted += 1
            t0 = time.perf_counter()
            reads = self.window.popleft()
            for _view, future in reads:
                future.result()
            yield block, [view for view, _f in reads], time.perf_counter() - t0

    def close(self) -> None:
        for reads in self.window:
            for _view, future in reads:
                future.cancel()
        self.window.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def one_compute_thread(device: torch.device) -> int:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One compute thread: the other core reads, hashes and writes. Two intra-op threads would stall
        # on each other's barriers whenever I/O takes the second core.
        torch.set_num_threads(1)
    return threads


def stream_plan(plan: Plan, stores: dict[str, Store], sink: Sink, *, alpha: float, device: torch.device,
                block_bytes: int, prefetch: int, io_threads: int,
                on_block: Callable[[StreamTotals], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                merge: MergeContext | None = None, canon: dict[str, str] | None = None,
                ) -> tuple[list[FileRecord], dict[str, TensorStats], list[dict], StreamTotals]:
    blocks = build_blocks(plan, block_bytes, canon)
    threads = one_compute_thread(device)
    stats: dict[str, TensorStats] = {t.name: TensorStats() for t in plan.tensors}
    changed_buffers: list[dict] = []
    arithmetic = Arithmetic(device)
    totals = StreamTotals()
    buffers_pool = BufferPool()
    writer = _Writer(sink, plan, buffers_pool)
    writer.start()
    try:
        with BlockReader(blocks, stores, buffers_pool, io_threads, prefetch) as reader:
            for block, buffers, waited in reader:
                if should_cancel is not None and should_cancel():
                    raise GraftCancelled()
                t1 = time.perf_counter()
                totals.bytes_read += sum(len(b) for b in buffers)
                out = buffers_pool.take(block.out_bytes)
                for piece in block.pieces:
                    _compute_piece(piece, buffers, out, arithmetic, alpha, stats, changed_buffers, merge)
                    if piece.last:
                        totals.tensors_done += 1
                for view in buffers:
                    buffers_pool.give(view)
                t2 = time.perf_counter()
                writer.put((block, out))
                t3 = time.perf_counter()
                totals.wait_read_s += waited
                totals.compute_s += t2 - t1
                totals.wait_write_s += t3 - t2
                totals.bytes_written += len(out)
                if on_block is not None:
                    on_block(totals)
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
        torch.set_num_threads(threads)
    return writer.records, stats, changed_buffers, totals


def rank_statistics(plan: Plan, merge: MergeContext, stores: dict[str, Store], *, device: torch.device,
                    block_bytes: int, prefetch: int, io_threads: int, canon: dict[str, str] | None = None,
                    should_cancel: Callable[[], bool] | None = None,
                    on_pass: Callable[[int, int, int], None] | None = None) -> int:
    """The statistics passes of a recipe whose transforms keep magnitude-rank windows: two reads of the
    diffs those windows belong to (coarse, then fine radix select), after which every window holds its exact
    thresholds. Returns the bytes read. `on_pass(pass, blocks_done, blocks_total)` reports progress."""
    items = merge.windows()
    if not items:
        return 0
    by_name = {t.name: t for t in plan.tensors}
    pseudo, selectors = [], {}
    for name, use in items:
        tensor = by_name[name]
        roles = (base_role(use.index), finetuned_role(use.index))
        segments = [Segment("stat", seg.start, seg.stop) for seg in tensor.segments if seg.op == "merge"]
        key = f"{name}\x00{use.index}"
        pseudo.append(OutputTensor(key, "F32", tensor.shape, "stat", segments,
                                   {r: tensor.sources[r] for r in roles}, tensor.compute_dtype))
        selectors[key] = RankSelect([use.window])
    stat_plan = Plan(pseudo, [Shard("statistics", pseudo)], [], [], {}, False, {})
    blocks = build_blocks(stat_plan, block_bytes, canon)
    threads = one_compute_thread(device)
    scratch, cpu = Scratch(), torch.device("cpu")
    read = 0
    try:
        for pass_index, (add, finish) in enumerate((("add_coarse", "finish_coarse"), ("add_fine", "finish_fine"))):
            buffers_pool = BufferPool()
            with BlockReader(blocks, stores, buffers_pool, io_threads, prefetch) as reader:
                for done, (block, buffers, _waited) in enumerate(reader):
                    if should_cancel is not None and should_cancel():
                        raise GraftCancelled()
                    read += sum(len(b) for b in buffers)
                    for piece in block.pieces:
                        selector = selectors[piece.tensor.name]
                        s_role, f_role = piece.tensor.sources
                        count = piece.stop - piece.start
                        s = view_of(buffers, piece.reads[s_role], piece.tensor.sources[s_role].dtype, count)
                        f = view_of(buffers, piece.reads[f_role], piece.tensor.sources[f_role].dtype, count)
                        compute = DTYPES[piece.tensor.compute_dtype]
                        for i in range(0, count, CHUNK):
                            m = min(CHUNK, count - i)
                            delta, base = scratch.get("delta", m, compute, cpu), scratch.get("base", m, compute, cpu)
                            delta.copy_(f[i:i + m])
                            delta.sub_(base.copy_(s[i:i + m]))
                            getattr(selector, add)(magnitude_bits(delta))
                        if piece.last:
                            getattr(selector, finish)()
                    for view in buffers:
                        buffers_pool.give(view)
                    if on_pass is not None:
                        on_pass(pass_index, done + 1, len(blocks))
    finally:
        torch.set_num_threads(threads)
    return read


def view_of(buffers: list, ref: tuple[int, int], dtype: str, count: int) -> torch.Tensor:
    idx, offset = ref
    return torch.frombuffer(buffers[idx], dtype=DTYPES[dtype], count=count, offset=offset)


def _compute_piece(piece: Piece, buffers: list[memoryview], out: memoryview, arithmetic: Arithmetic, alpha: float,
                   stats: dict[str, TensorStats], changed: list[dict], merge: MergeContext | None = None) -> None:
    tensor = piece.tensor
    count = piece.stop - piece.start
    out_t = torch.frombuffer(out, dtype=DTYPES[tensor.dtype], count=count, offset=piece.out_offset)
    st = stats[tensor.name]
    src = tensor.sources
    if piece.op == "merge":
        uses = merge.uses[tensor.name]
        target = view_of(buffers, piece.reads["target_base"], src["target_base"].dtype, count)
        pairs = [tuple(view_of(buffers, piece.reads[r], src[r].dtype, count)
                       for r in (base_role(u.index), finetuned_role(u.index))) for u in uses]
        merge_chunks(out_t, target, pairs, uses, merge, tensor.name, piece.start, DTYPES[tensor.compute_dtype], st,
                     arithmetic.device, arithmetic.whole_pieces)
        return
    if piece.op == "transfer":
        t, s, f = (view_of(buffers, piece.reads[r], src[r].dtype, count)
                   for r in ("target_base", "source_base", "source_finetuned"))
        arithmetic.transfer(out_t, t, s, f, alpha, DTYPES[tensor.compute_dtype], st)
        return
    role = _roles(tensor, piece.op)[0]
    info = src[role]
    is_float = tensor.dtype in ("F64", "F32", "F16", "BF16")
    if info.dtype == tensor.dtype and not is_float:
        idx, offset = piece.reads[role]
        n = count * itemsize(info.dtype)
        out[piece.out_offset:piece.out_offset + n] = buffers[idx][offset:offset + n]
    else:
        arithmetic.copy(out_t, view_of(buffers, piece.reads[role], info.dtype, count), is_float, st)
    if tensor.check_sources_equal:
        s = view_of(buffers, piece.reads["source_base"], src["source_base"].dtype, count)
        f = view_of(buffers, piece.reads["source_finetuned"], src["source_finetuned"].dtype, count)
        if not torch.equal(s, f):
            changed.append({"code": "buffer_changed_by_finetune", "tensor": tensor.name,
                            "message": f"{tensor.name} is not a float tensor and differs between the sources; "
                                       "the target's value was kept"})
