"""The accelerator path measured beside the CPU path on one machine, in one run: the same generated bf16
Llama-shaped job grafted with --device cpu and --device cuda, best of N, and the outputs compared byte for
byte (the CUDA path must write exactly the CPU path's bytes).

    python bench/bench_device.py [--layers 5,10] [--repeat 3] [--job plain|ties]

Prints, per model size and device: streaming GB/s (input bytes / streaming phase), wall seconds of run_graft,
where the compute thread's time went, and whether the output files' sha256 agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCH = os.path.join(ROOT, ".bench")


def _request(job: str, paths: dict[str, str], out: str, device: str):
    """`plain`: the fine-tuning transfer. `ties`: TIES over two fine-tunes of one base (the generated trio's
    fine-tune and its drifted target are both perturbations of its base), base as target, density 0.2."""
    from worker.engine import GraftOptions, GraftRequest
    from worker.engine.planning.recipe import load_recipe

    if job == "plain":
        return GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], out,
                            GraftOptions(device=device))
    base = paths["source_base"]
    recipe = load_recipe({"target_base": base, "merge": {"method": "ties", "density": 0.2},
                          "diffs": [{"source_base": base, "source_finetuned": paths["source_finetuned"]},
                                    {"source_base": base, "source_finetuned": paths["target_base"]}],
                          "options": {"device": device}})
    return GraftRequest(recipe, out)


def main() -> int:
    import torch

    from bench.bench_engine import input_bytes, model_dir, warm
    from worker.engine import run_graft
    from worker.service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="5,10")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--job", choices=("plain", "ties"), default="plain",
                    help="plain: the fine-tuning transfer; ties: TIES over two fine-tunes of one base")
    args = ap.parse_args()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    if torch.cuda.is_available():
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, job {args.job}")
    else:
        print(f"torch {torch.__version__}: no GPU visible; CPU only")
    settings = Settings(cache_dir="", hash_inputs=False)
    os.makedirs(BENCH, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="graft-device-", dir=BENCH)
    try:
        print(f"{'model':>6} {'input':>8} | {'device':<6} {'GB/s best':>9} {'GB/s range':>13} {'wall s':>7} "
              f"{'compute s':>9} {'wait read s':>11} | output")
        for layers in [int(x) for x in args.layers.split(",")]:
            paths = model_dir(layers)
            size = input_bytes(paths)
            digests = {}
            for device in devices:
                rates, best = [], None
                for i in range(args.repeat):
                    out = os.path.join(tmp, f"l{layers}-{device}-{i}")
                    warm(paths)
                    request = _request(args.job, paths, out, device)
                    t0 = time.perf_counter()
                    result = run_graft(request, settings=settings)
                    wall = time.perf_counter() - t0
                    stats = result.stats
                    rates.append(stats["input_gb_per_s"])
                    if best is None or stats["input_gb_per_s"] > best[0]["input_gb_per_s"]:
                        best = (stats, wall)
                    digests.setdefault(device, {f.path: f.sha256 for f in result.files if f.path.endswith(
                        ".safetensors")})
                    shutil.rmtree(out, ignore_errors=True)
                stats, wall = best
                same = "same bytes as cpu" if digests.get(device) == digests.get("cpu") else "DIFFERS from cpu"
                ct = stats["compute_thread"]
                print(f"L{layers:>5} {size / 1e9:>6.2f}GB | {device:<6} {max(rates):>9.2f} "
                      f"{min(rates):>6.2f}-{max(rates):<6.2f} {wall:>7.2f} {ct['computing_s']:>9.2f} "
                      f"{ct['waiting_reads_s']:>11.2f} | {same if device != 'cpu' else '-'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
