"""The one pass runner over the weights: it walks a pass's blocks (worker/engine/compute/blocks.py), reads each
block's input ranges ahead of the compute on a thread pool into pooled buffers, checks for cancellation
between blocks, reports progress after each, and hands every piece to the pass's visitor: the graft's compute
(stream.py), the statistics passes a recipe's methods need (statistics_pass.py) and the inspection's weights
level (worker/engine/checks/inspect/weights.py). Memory is bounded by block size times the read-ahead depth,
never by the model size."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.engine.compute.blocks import Block, Piece
from worker.engine.errors import GraftCancelled
from worker.engine.planning.options import base_role, delta_role, finetuned_role
from worker.engine.storage.buffers import BufferPool
from worker.engine.storage.safetensors_format import DTYPES
from worker.engine.storage.stores import Store


@dataclass
class Reading:
    """How a pass reads and computes: the stores by role, the roles naming one model (`canon`: role -> the role
    whose store is read), the device, the block size, the read-ahead and the cancel flag."""

    stores: dict[str, Store]
    canon: dict[str, str] | None
    device: torch.device
    block_bytes: int
    prefetch: int
    io_threads: int
    should_cancel: Callable[[], bool] | None = None


@dataclass
class PassTotals:
    bytes_total: int = 0  # what the pass's blocks read
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_total: int = 0
    tensors_done: int = 0
    blocks_done: int = 0
    seconds: float = 0.0
    # Where the compute thread's time went: a well-fed pipeline spends it computing.
    wait_read_s: float = 0.0
    compute_s: float = 0.0
    wait_write_s: float = 0.0


class Visitor(Protocol):
    def visit(self, piece: Piece, buffers: list[memoryview], out: memoryview | None) -> None:
        """One piece: its inputs are in `buffers` (piece.reads says where); `out`, the block's output buffer
        of a pass that writes (the piece's bytes at piece.out_offset), else None."""


class Output(Protocol):
    """Where a writing pass's finished blocks go (the graft's writer thread); it shares the pass's buffers."""

    pool: BufferPool

    def put(self, item: tuple[Block, memoryview]) -> None: ...


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


def view_of(buffers: list, ref: tuple[int, int], dtype: str, count: int) -> torch.Tensor:
    idx, offset = ref
    return torch.frombuffer(buffers[idx], dtype=DTYPES[dtype], count=count, offset=offset)


def diff_roles(sources: dict, index: int) -> tuple[str, ...]:
    """What diff `index` of a piece reads: its (base, fine-tune), or a diff artifact's decoded delta alone."""
    role = delta_role(index)
    return (role,) if role in sources else (base_role(index), finetuned_role(index))


def pair_views(buffers: list, piece: Piece, index: int, count: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Diff `index`'s inputs in one piece: (base, fine-tune), or (None, delta) for a diff artifact, whose delta
    is the float32 (float64) difference the pair's would be, formed at extraction."""
    sources = piece.tensor.sources
    roles = diff_roles(sources, index)
    views = [view_of(buffers, piece.reads[r], sources[r].dtype, count) for r in roles]
    return (None, views[0]) if len(views) == 1 else (views[0], views[1])


def run_pass(blocks: list[Block], reading: Reading, visitor: Visitor, *, output: Output | None = None,
             on_block: Callable[[PassTotals], None] | None = None, totals: PassTotals | None = None) -> PassTotals:
    """Walk `blocks` in order, every piece to `visitor`; a writing pass (`output`) fills one output buffer per
    block and hands it over. GraftCancelled between blocks once `reading.should_cancel()` says so."""
    totals = totals or PassTotals()
    totals.bytes_total = totals.bytes_total or sum(r[3] for b in blocks for r in b.reads)
    pool = output.pool if output is not None else BufferPool()
    started = time.perf_counter()
    threads = one_compute_thread(reading.device)
    try:
        with BlockReader(blocks, reading.stores, pool, reading.io_threads, reading.prefetch) as reader:
            for block, buffers, waited in reader:
                if reading.should_cancel is not None and reading.should_cancel():
                    raise GraftCancelled()
                t1 = time.perf_counter()
                totals.bytes_read += sum(len(b) for b in buffers)
                out = pool.take(block.out_bytes) if output is not None else None
                for piece in block.pieces:
                    visitor.visit(piece, buffers, out)
                    totals.tensors_done += piece.last
                for view in buffers:
                    pool.give(view)
                t2 = time.perf_counter()
                if output is not None:
                    totals.bytes_written += len(out)  # before the hand-over: the writer releases `out`
                    output.put((block, out))
                totals.wait_read_s += waited
                totals.compute_s += t2 - t1
                totals.wait_write_s += time.perf_counter() - t2
                totals.blocks_done += 1
                if on_block is not None:
                    on_block(totals)
    finally:
        torch.set_num_threads(threads)
    totals.seconds += time.perf_counter() - started
    return totals
