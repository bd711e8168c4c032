"""Estimates from the plan alone: bytes read and written, shards, the memory the engine holds, and time on
this worker (its arithmetic timed on a tiny kernel now; storage speed is not measured).

Memory, as the stream really holds it (worker/engine/compute/stream.py):
- input buffers: the block being computed plus `prefetch_blocks` read ahead, each block's reads as built
  (roles naming one model share them); the largest such run of consecutive blocks is taken;
- output buffers (a graft only): the block being computed, two queued for the writer, one being written;
- chunk scratch: a few float32 chunks per input (worker/engine/compute/arithmetic.CHUNK elements each);
- remote I/O: each remote input's windows, and an S3 output's parts in flight (plan.memory).
The interpreter and torch themselves add some 0.3-0.5 GB of resident memory on top.
"""

from __future__ import annotations

import time

import torch

from worker.engine.checks.inspect.weights import _Accumulator, diff_pairs, weights_visits
from worker.engine.compute.arithmetic import CHUNK, Arithmetic
from worker.engine.compute.blocks import Block, build_blocks, graft_groups
from worker.engine.compute.passes import one_compute_thread
from worker.engine.compute.tensor_stats import TensorStats
from worker.engine.config import EngineSettings
from worker.engine.planning.plan import Plan

KERNEL_SECONDS = 0.025  # per kernel timed (two kernels: the graft's transfer and the weights pass's sums)
KERNEL_ELEMENTS = 4 * CHUNK
OUTPUT_BLOCKS_HELD = 4  # computing, two queued (the writer's queue holds two), writing
PROCESS_BASELINE = "about 0.3-0.5 GB for the interpreter and torch, not included"


def _held(blocks: list[Block], prefetch: int) -> int:
    """The most input bytes the reader holds at once: `prefetch + 1` consecutive blocks."""
    sizes = [sum(r[3] for r in b.reads) for b in blocks]
    span = prefetch + 1
    window = sum(sizes[:span])
    best = window
    for i in range(span, len(sizes)):
        window += sizes[i] - sizes[i - span]
        best = max(best, window)
    return best


def _memory(blocks: list[Block], settings: EngineSettings, plan: Plan, *, output: bool, s3_output: bool,
            scratch_chunks: int) -> dict:
    held = _held(blocks, settings.prefetch_blocks)
    out = OUTPUT_BLOCKS_HELD * max((b.out_bytes for b in blocks), default=0) if output else 0
    scratch = scratch_chunks * CHUNK * 4  # float32 chunks (float64 inputs double it)
    remote = plan.memory.get("remote_input_bytes", 0)
    upload = plan.memory.get("s3_output_bytes", 0) if output and s3_output else 0
    return {"input_buffers": held, "output_buffers": out, "scratch": scratch, "remote_windows": remote,
            "upload_parts": upload, "total": held + out + scratch + remote + upload}


def _time(kernel, elements: int) -> float:
    """Elements per second of `kernel(elements)` on one thread (as the stream computes), ~KERNEL_SECONDS."""
    threads = one_compute_thread(torch.device("cpu"))
    try:
        kernel()  # warm: scratch allocated, code paths loaded
        runs, start = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - start < KERNEL_SECONDS:
            kernel()
            runs += 1
        return runs * elements / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def throughput(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Elements per second of the graft's transfer kernel and of the weights pass's sums, measured now."""
    g = torch.Generator().manual_seed(0)
    t, s, f = (torch.randn(KERNEL_ELEMENTS, generator=g).to(dtype) for _ in range(3))
    out = torch.empty_like(t)
    arithmetic, acc = Arithmetic(torch.device("cpu")), _Accumulator()
    return {
        "transfer": _time(lambda: arithmetic.transfer(out, t, s, f, 1.0, torch.float32, TensorStats()),
                          KERNEL_ELEMENTS),
        "weights": _time(lambda: acc.piece(t, [(s, f)], torch.float32, [TensorStats()]), KERNEL_ELEMENTS),
    }


def _dominant_dtype(plan: Plan) -> torch.dtype:
    from worker.engine.storage.safetensors_format import DTYPES

    sizes: dict[str, int] = {}
    for t in plan.tensors:
        for info in t.sources.values():
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.numel
    name = max(sizes, key=sizes.__getitem__, default="BF16")
    return DTYPES[name] if name in ("F64", "F32", "F16", "BF16") else torch.bfloat16


def estimate(plan: Plan, settings: EngineSettings, canon: dict[str, str], *, s3_output: bool,
             measure: bool = True) -> dict:
    """Bytes, shards, memory and time of the graft the plan describes and of the weights-level pass."""
    graft_blocks = build_blocks(graft_groups(plan, plan.merge.rows if plan.merge else None), settings.block_bytes,
                                canon)
    weights_blocks = build_blocks([(None, weights_visits(plan))], settings.block_bytes, canon)
    diffs = 1 + max((u.index for uses in plan.merge.uses.values() for u in uses), default=0) if plan.merge else 1
    # The plain kernel's three chunks (every merged tensor the plain transfer: the compute step's choice); a
    # recipe's merge kernel: an accumulator, temporaries and a base and delta per diff.
    plain = plan.merge is None or all(plan.merge.plain_alpha(name) is not None for name in plan.merge.uses)
    graft_chunks = 3 if plain else 4 + 2 * diffs
    spans = {t.name: sum(s.stop - s.start for s in t.segments if s.op in ("transfer", "merge")) for t in plan.tensors}
    transfer_elements = sum(spans.values())
    # The weights pass's sums run once per diff a tensor takes.
    weights_elements = sum(n * len(diff_pairs(plan, name)) for name, n in spans.items())
    out = {
        "input_bytes": plan.input_bytes(),
        "graft_bytes_read": sum(r[3] for b in graft_blocks for r in b.reads),
        "weights_bytes_read": sum(r[3] for b in weights_blocks for r in b.reads),
        # A recipe's statistics (magnitude windows, norms, selections) read its diffs again before the compute pass.
        "graft_statistics_passes": plan.merge.passes() if plan.merge is not None else 0,
        "output_bytes": plan.output_bytes,
        "shards": len(plan.shards),
        "shard_files": [s.file for s in plan.shards][:20],
        "transferred_elements": transfer_elements,
        "memory": {"graft": _memory(graft_blocks, settings, plan, output=True, s3_output=s3_output,
                                  scratch_chunks=graft_chunks),
                   "weights_pass": _memory(weights_blocks, settings, plan, output=False, s3_output=False,
                                           scratch_chunks=3),
                   "process_baseline": PROCESS_BASELINE},
    }
    if measure:
        rates = throughput(_dominant_dtype(plan))
        out["time"] = {
            "estimate": True, "device": "cpu", "threads": 1,
            "elements_per_second": {k: round(v) for k, v in rates.items()},
            "graft_compute_seconds": round(transfer_elements / rates["transfer"], 3),
            "weights_compute_seconds": round(weights_elements / rates["weights"], 3),
            "note": "compute on one CPU thread, timed on a tiny kernel now; reads overlap it, so each takes "
                    "about max(this, its bytes read / your storage's read speed), plus resolving the models",
        }
    return out
