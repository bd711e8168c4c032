"""Engine benchmark: throughput and peak memory of `graft run` against a naive safetensors loop and,
with --mergekit, mergekit 0.1.5 (installed into its own virtualenv), side by side in one run.

    .venv/bin/python bench/bench_engine.py                  # graft + naive loop, 3 model sizes
    .venv/bin/python bench/bench_engine.py --mergekit       # also mergekit's linear merge

Inputs are three related bf16 Llama-shaped checkpoints generated here (cached under .bench/), with the
page cache warmed before each run. Figures: input GB/s (bytes of the three inputs / wall time of the
graft, process start excluded where the tool reports it) and peak RSS of the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCH = os.path.join(ROOT, ".bench")
PY = sys.executable
MERGEKIT_VENV = os.path.join(BENCH, "mergekit-venv")

NAIVE = r'''
import sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
import glob, os
t_dir, s_dir, f_dir, out = sys.argv[1:5]
def handles(d):
    files = {}
    for path in glob.glob(os.path.join(d, "*.safetensors")):
        h = safe_open(path, "pt")
        for k in h.keys():
            files[k] = h
    return files
T, S, F = handles(t_dir), handles(s_dir), handles(f_dir)
result = {}
for name, h in T.items():
    t = h.get_tensor(name)
    if name in S and name in F and t.is_floating_point():
        s, f = S[name].get_tensor(name), F[name].get_tensor(name)
        t = (t.float() + (f.float() - s.float())).to(t.dtype)
    result[name] = t
save_file(result, os.path.join(out, "model.safetensors"))
'''


def model_dir(layers: int) -> dict[str, str]:
    from worker.devtools.sample_models import LlamaShape, make_trio

    root = os.path.join(BENCH, f"llama-l{layers}")
    if not os.path.exists(os.path.join(root, "target_base", "config.json")):
        shutil.rmtree(root, ignore_errors=True)
        shape = LlamaShape(vocab=32000, hidden=2048, layers=layers, intermediate=5632, heads=16, kv_heads=4)
        # No added rows: mergekit's linear merge needs equal shapes without a tokenizer source.
        make_trio(root, shape=shape, added_rows=0, shards=(1, 2, 3), target_only=False)
    return {r: os.path.join(root, r) for r in ("source_base", "source_finetuned", "target_base")}


def input_bytes(paths: dict[str, str]) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d in paths.values() for f in os.listdir(d)
               if f.endswith(".safetensors"))


def warm(paths: dict[str, str]) -> None:
    for d in paths.values():
        for f in os.listdir(d):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(16 << 20):
                    pass


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GB, and stdout. /usr/bin/time measures the peak: rusage taken here would
    count this (large) process's pages, which a forked child shares until it execs."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd], capture_output=True,
                              text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
        peak_kb = int(rss_file.read().strip().splitlines()[-1])
    return wall, peak_kb / 1e6, proc.stdout


def run_graft(paths, out, *, env_extra=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    cmd = [os.path.join(os.path.dirname(PY), "graft"), "run", "--source-base", paths["source_base"],
           "--source-finetuned", paths["source_finetuned"], "--target-base", paths["target_base"],
           "--output", out, "--json"]
    wall, rss, stdout = timed(cmd, env)
    stats = json.loads(stdout.strip().splitlines()[-1])["stats"]
    return {"wall_s": wall, "stream_s": stats["seconds_streaming"], "rss_gb": rss,
            "gbps": stats["input_gb_per_s"], "compute_thread": stats["compute_thread"]}


def run_naive(paths, out) -> dict:
    os.makedirs(out, exist_ok=True)
    wall, rss, _ = timed([PY, "-c", NAIVE, paths["target_base"], paths["source_base"],
                          paths["source_finetuned"], out])
    return {"wall_s": wall, "rss_gb": rss}


def ensure_mergekit() -> str:
    exe = os.path.join(MERGEKIT_VENV, "bin", "mergekit-yaml")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "venv", MERGEKIT_VENV], check=True)
        pip = os.path.join(MERGEKIT_VENV, "bin", "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)  # CPU build, before the rest
        subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)
    return exe


def run_mergekit(exe, paths, out) -> dict:
    cfg = os.path.join(out + ".yml")
    with open(cfg, "w") as fh:
        fh.write(f"""merge_method: linear
models:
  - model: {paths['target_base']}
    parameters: {{weight: 1.0}}
  - model: {paths['source_finetuned']}
    parameters: {{weight: 1.0}}
  - model: {paths['source_base']}
    parameters: {{weight: -1.0}}
parameters: {{normalize: false}}
dtype: bfloat16
""")
    wall, rss, _ = timed([exe, cfg, out, "--lazy-unpickle", "--allow-crimes", "--no-copy-tokenizer"])
    return {"wall_s": wall, "rss_gb": rss}


def startup(tmp: str) -> float:
    from worker.devtools.sample_models import make_trio

    paths = make_trio(os.path.join(tmp, "tiny"))
    out = os.path.join(tmp, "tiny-out")
    cmd = [os.path.join(os.path.dirname(PY), "graft"), "run", "--source-base", paths["source_base"],
           "--source-finetuned", paths["source_finetuned"], "--target-base", paths["target_base"], "--output", out]
    best = float("inf")
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        best = min(best, timed(cmd)[0])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,5,10", help="model sizes as Llama layer counts (2048 hidden)")
    ap.add_argument("--mergekit", action="store_true", help="also run mergekit 0.1.5 (installs it once)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and size; the best is shown")
    args = ap.parse_args()
    os.makedirs(BENCH, exist_ok=True)
    exe = ensure_mergekit() if args.mergekit else None
    tmp = tempfile.mkdtemp(prefix="graft-bench-", dir=BENCH)
    cache = tempfile.mkdtemp(prefix="digests-", dir=BENCH)
    try:
        print(f"CLI start-up + tiny graft: {startup(tmp):.2f} s (best of 3)")
        print(f"{'model':>8} {'input':>8} | {'tool':<26} {'wall s':>7} {'GB/s':>6} {'peak RSS':>9}")
        for layers in [int(x) for x in args.layers.split(",")]:
            paths = model_dir(layers)
            size = input_bytes(paths)
            rows = []
            runs = {
                "graft (cold digests)": partial(run_graft, paths, env_extra={"GRAFT_CACHE_DIR": ""}),
                "graft (digests known)": partial(run_graft, paths, env_extra={"GRAFT_CACHE_DIR": cache}),
                "graft (no input hashing)": partial(run_graft, paths, env_extra={"GRAFT_HASH_INPUTS": "false"}),
                "naive safetensors loop": partial(run_naive, paths),
            }
            if exe:
                runs["mergekit 0.1.5 linear"] = partial(run_mergekit, exe, paths)
            for name, fn in runs.items():
                best = None
                for i in range(args.repeat):
                    out = os.path.join(tmp, f"out-{layers}-{len(rows)}-{i}")
                    warm(paths)
                    r = fn(out)
                    shutil.rmtree(out, ignore_errors=True)
                    if best is None or r["wall_s"] < best["wall_s"]:
                        best = r
                seconds = best.get("stream_s") or best["wall_s"]
                rows.append((name, best, size / seconds / 1e9))
            for name, r, gbps in rows:
                wall = f"{r['wall_s']:.2f}" + (f" ({r['stream_s']:.2f})" if "stream_s" in r else "")
                print(f"L{layers:>7} {size / 1e9:>6.2f}GB | {name:<26} {wall:>13} {gbps:>6.2f} {r['rss_gb']:>7.2f}GB")
        print("graft GB/s are input bytes over the streaming phase (process start and model resolution excluded; "
              "wall includes them). naive/mergekit GB/s are over their whole wall time.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
