"""Streaming a plan: cut it into bounded blocks, read each block's input ranges ahead of time on a
thread pool (adjacent ranges coalesced into one request), compute, and hand finished bytes to a writer
thread. Memory is bounded by block size times the read-ahead depth, never by the model size."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .buffers import BufferPool
from .errors import GraftCancelled, GraftError
from .plan import OutputTensor, Plan, Shard
from .safetensors_format import DTYPES, build_header, itemsize
from .sinks import FileRecord, Sink
from .stores import Store
from .transforms import Arithmetic, TensorStats

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
    return _ROLES_FOR_OP[op]


def _coalesce(block: Block, wanted: list[tuple[Piece, str, str, int, int]]) -> None:
    """Group the pieces' reads into as few ranged requests as the gaps allow."""
    by_file: dict[tuple[str, str], list] = {}
    for item in wanted:
        by_file.setdefault((item[1], item[2]), []).append(item)
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


def build_blocks(plan: Plan, block_bytes: int) -> list[Block]:
    blocks: list[Block] = []
    for shard_index, shard in enumerate(plan.shards):
        header, _ = build_header([(t.name, t.dtype, t.shape) for t in shard.tensors], {"format": "pt"})
        current: Block | None = None
        wanted: list = []

        def close() -> None:
            nonlocal current, wanted
            if current is not None:
                _coalesce(current, wanted)
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


def stream_plan(plan: Plan, stores: dict[str, Store], sink: Sink, *, alpha: float, device: torch.device,
                block_bytes: int, prefetch: int, io_threads: int,
                on_block: Callable[[StreamTotals], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                ) -> tuple[list[FileRecord], dict[str, TensorStats], list[dict], StreamTotals]:
    blocks = build_blocks(plan, block_bytes)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One compute thread: the other core reads, hashes and writes. Two intra-op threads would stall
        # on each other's barriers whenever I/O takes the second core.
        torch.set_num_threads(1)
    stats: dict[str, TensorStats] = {t.name: TensorStats() for t in plan.tensors}
    changed_buffers: list[dict] = []
    arithmetic = Arithmetic(device)
    totals = StreamTotals()
    buffers_pool = BufferPool()
    writer = _Writer(sink, plan, buffers_pool)
    writer.start()
    pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="graft-read")
    window: deque[list[tuple[memoryview, Future]]] = deque()
    submitted = 0

    def submit(index: int) -> list[tuple[memoryview, Future]]:
        reads = []
        for role, file, start, length in blocks[index].reads:
            view = buffers_pool.take(length)
            reads.append((view, pool.submit(stores[role].stream_into, file, start, view)))
        return reads

    try:
        for index, block in enumerate(blocks):
            while submitted < len(blocks) and submitted <= index + prefetch:
                window.append(submit(submitted))
                submitted += 1
            if should_cancel is not None and should_cancel():
                raise GraftCancelled()
            t0 = time.perf_counter()
            reads = window.popleft()
            for _view, future in reads:
                future.result()
            t1 = time.perf_counter()
            buffers = [view for view, _f in reads]
            totals.bytes_read += sum(len(b) for b in buffers)
            out = buffers_pool.take(block.out_bytes)
            for piece in block.pieces:
                _compute_piece(piece, buffers, out, arithmetic, alpha, stats, changed_buffers)
                if piece.last:
                    totals.tensors_done += 1
            for view in buffers:
                buffers_pool.give(view)
            t2 = time.perf_counter()
            writer.put((block, out))
            t3 = time.perf_counter()
            totals.wait_read_s += t1 - t0
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
        for reads in window:
            for _view, f in reads:
                f.cancel()
        if writer.is_alive():
            writer.error = writer.error or GraftError("aborted", "stream aborted")
            writer.q.put(None)
            writer.join()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    return writer.records, stats, changed_buffers, totals


def _view(buffers: list, ref: tuple[int, int], dtype: str, count: int) -> torch.Tensor:
    idx, offset = ref
    return torch.frombuffer(buffers[idx], dtype=DTYPES[dtype], count=count, offset=offset)


def _compute_piece(piece: Piece, buffers: list[memoryview], out: memoryview, arithmetic: Arithmetic, alpha: float,
                   stats: dict[str, TensorStats], changed: list[dict]) -> None:
    tensor = piece.tensor
    count = piece.stop - piece.start
    out_t = torch.frombuffer(out, dtype=DTYPES[tensor.dtype], count=count, offset=piece.out_offset)
    st = stats[tensor.name]
    src = tensor.sources
    if piece.op == "transfer":
        t, s, f = (_view(buffers, piece.reads[r], src[r].dtype, count)
                   for r in ("target_base", "source_base", "source_finetuned"))
        arithmetic.transfer(out_t, t, s, f, alpha, DTYPES[tensor.compute_dtype], st)
        return
    role = "target_base" if piece.op == "target" else "source_finetuned"
    info = src[role]
    is_float = tensor.dtype in ("F64", "F32", "F16", "BF16")
    if info.dtype == tensor.dtype and not is_float:
        idx, offset = piece.reads[role]
        n = count * itemsize(info.dtype)
        out[piece.out_offset:piece.out_offset + n] = buffers[idx][offset:offset + n]
    else:
        arithmetic.copy(out_t, _view(buffers, piece.reads[role], info.dtype, count), is_float, st)
    if tensor.check_sources_equal:
        s = _view(buffers, piece.reads["source_base"], src["source_base"].dtype, count)
        f = _view(buffers, piece.reads["source_finetuned"], src["source_finetuned"].dtype, count)
        if not torch.equal(s, f):
            changed.append({"code": "buffer_changed_by_finetune", "tensor": tensor.name,
                            "message": f"{tensor.name} is not a float tensor and differs between the sources; "
                                       "the target's value was kept"})
