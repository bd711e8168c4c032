"""A simulated 405B graft split by output shard, from synthetic headers alone (no tensor data): how long planning
takes, how many shard tasks it makes, what one task holds in memory at most, and how large the task graph and
its records in Redis are (issue 18).

    .venv/bin/python bench/bench_shard_plan.py [--repeat 5] [--shard-size 5GB]

The three models are Llama 3.1 405B's shape (126 layers, hidden 16384, intermediate 53248, 128 heads, 8 KV
heads, vocabulary 128256, bf16: 811 GB each), laid out as the hub's checkpoints are (tensors sorted by layer,
cut into ~5 GB files), behind a store that holds headers only: nothing is read. Each round plans the graft
(resolve's plan_models path: the recipe planner), describes the split as the job stores it
(pipeline/shards.py describe_split: the plan's digest, the inputs' identities, the shards) and checks a task's
plan against it (what every shard task does first). Best of --repeat, with the range.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from worker.engine.config import EngineSettings  # noqa: E402
from worker.engine.errors import GraftError  # noqa: E402
from worker.engine.planning.options import GraftOptions  # noqa: E402
from worker.engine.planning.recipe import Recipe  # noqa: E402
from worker.engine.planning.recipe_plan import build_recipe_plan  # noqa: E402
from worker.engine.storage.lanes import RemoteReads  # noqa: E402
from worker.engine.storage.model import ResolvedModel  # noqa: E402
from worker.engine.storage.safetensors_format import TensorInfo  # noqa: E402
from worker.engine.storage.stores import Store  # noqa: E402
from worker.engine.storage.uris import parse_uri  # noqa: E402

L405 = {"hidden": 16384, "layers": 126, "intermediate": 53248, "heads": 128, "kv_heads": 8, "vocab": 128256}
FILE_BYTES = 5 * 10**9


class HeadersOnly(Store):
    """A model's files by name and size; any read is a bug of the bench (the planner reads no data)."""

    def __init__(self, uri: str, files: dict[str, int]) -> None:
        self.location = parse_uri(uri)
        self._sizes = files
        self.revision = None

    def list_files(self) -> dict[str, int]:
        return dict(self._sizes)

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        raise AssertionError(f"the plan read {name}")

    def fingerprint(self, name: str) -> dict:
        return {"size": self.size(name), "etag": f"{hash((str(self.location), name)) & (2**64 - 1):016x}-1"}


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, hd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def synthetic_model(role: str, uri: str, s: dict) -> ResolvedModel:
    """The hub's layout: tensors in order, a new ~5 GB file when the current one is full; each file's header
    (about 100 bytes a tensor) before its data."""
    shapes = tensor_shapes(s)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > FILE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    n = len(groups)
    tensors, files = {}, {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        offset = 8 + 128 * len(group)
        for name, shape in group:
            end = offset + math.prod(shape) * 2
            tensors[name] = TensorInfo(name, file, "BF16", shape, offset, end)
            offset = end
        files[file] = offset
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": s["hidden"],
              "num_hidden_layers": s["layers"], "intermediate_size": s["intermediate"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    files["config.json"] = 1000
    return ResolvedModel(role, HeadersOnly(uri, files), config, tensors, sorted(f for f in files if f != "config.json"))


def one_round(models: dict[str, ResolvedModel], recipe: Recipe) -> dict:
    from worker.engine.pipeline.shards import check_split, describe_split

    by_uri = {m.uri: m for m in models.values()}
    t0 = time.perf_counter()
    plan, plan.merge = build_recipe_plan(recipe, by_uri)
    t1 = time.perf_counter()
    split = describe_split(plan, models)
    stored = json.dumps(split)
    t2 = time.perf_counter()
    check_split(json.loads(stored), plan, models)
    t3 = time.perf_counter()
    return {"plan_s": t1 - t0, "describe_s": t2 - t1, "check_s": t3 - t2, "plan": plan, "split": split,
            "stored_bytes": len(stored)}


def memory_per_task(settings: EngineSettings, plan) -> dict:
    """What one shard task holds at most, by the engine's own bounds: the remote windows of each distinct input
    (resolve.memory_bound's formula), the S3 output's parts in flight, and the stream's block buffers (each
    input's bytes of a block, read `prefetch_blocks` ahead, and the output blocks queued to the writer)."""
    reads = RemoteReads(lanes=settings.remote_lanes, window_bytes=settings.remote_window_bytes,
                        windows=settings.remote_windows)
    remote = 3 * reads.memory_bytes
    parts = settings.s3_part_bytes * (max(1, settings.s3_parts_in_flight) + 1)
    blocks = settings.block_bytes * (3 * (settings.prefetch_blocks + 1) + 3)
    largest = max(t.nbytes for t in plan.tensors)
    return {"remote_input_bytes": remote, "s3_output_bytes": parts, "block_bytes": blocks,
            "total_bytes": remote + parts + blocks, "largest_tensor_bytes": largest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shard-size", default="5GB")
    args = parser.parse_args()
    models = {role: synthetic_model(role, f"s3://models/{role}", L405)
              for role in ("source_base", "source_finetuned", "target_base")}
    recipe = Recipe.single(models["source_base"].uri, models["source_finetuned"].uri, models["target_base"].uri,
                           GraftOptions(shard_size=args.shard_size))
    rounds = [one_round(models, recipe) for _ in range(args.repeat)]
    tracemalloc.start()  # one more round, traced apart (tracing slows what it traces)
    one_round(models, recipe)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    last = rounds[-1]
    plan, split = last["plan"], last["split"]
    shards = split["shards"]
    per_task_in = [s["input_bytes"] for s in shards]
    mem = memory_per_task(EngineSettings(), plan)
    # What a task's result adds to Redis: a file record, per tensor its statistics and merge report, bytes moved.
    per_tensor = len(json.dumps({"delta_sq": 1e-3, "target_sq": 1.0, "bases_sq": 1e-2, "cross": 1e-4,
                                 "nonfinite": False, "elements": 10**8, "sketch": {}}))
    results_bytes = len(plan.tensors) * (per_tensor + 40) + len(shards) * 300

    def best(key: str) -> str:
        values = [r[key] for r in rounds]
        return f"{min(values) * 1000:.0f} ms [{min(values) * 1000:.0f}-{max(values) * 1000:.0f}]"

    print(f"405B (Llama 3.1 shape), bf16, {len(plan.tensors)} tensors, {split['output_bytes'] / 1e9:.0f} GB out, "
          f"{split['input_bytes'] / 1e12:.2f} TB read; shard_size {args.shard_size}; best of {args.repeat} [range]")
    print(f"  plan from headers      {best('plan_s')}")
    print(f"  describe split (JSON)  {best('describe_s')}   stored with the job: {last['stored_bytes'] / 1e3:.1f} kB")
    print(f"  a task's check         {best('check_s')}")
    print(f"  shard tasks            {len(shards)} + 1 finalize = {len(shards) + 1} RQ jobs; "
          f"{len(shards) + 1} task records, results ~{results_bytes / 1e6:.2f} MB in Redis")
    print(f"  per task               reads {min(per_task_in) / 1e9:.1f}-{max(per_task_in) / 1e9:.1f} GB, "
          f"writes {min(s['bytes'] for s in shards) / 1e9:.1f}-{max(s['bytes'] for s in shards) / 1e9:.1f} GB")
    print(f"  memory bound per task  {mem['total_bytes'] / 2**20:.0f} MiB = remote windows "
          f"{mem['remote_input_bytes'] / 2**20:.0f} + S3 parts {mem['s3_output_bytes'] / 2**20:.0f} + blocks "
          f"{mem['block_bytes'] / 2**20:.0f} (defaults; the largest tensor, "
          f"{mem['largest_tensor_bytes'] / 1e9:.1f} GB, is streamed in blocks, never held)")
    print(f"  planner's Python heap  peak {peak / 2**20:.0f} MiB (tracemalloc, one round)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GraftError as err:
        print(f"error [{err.code}] {err.message}", file=sys.stderr)
        sys.exit(1)
