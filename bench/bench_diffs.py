"""Diff artifacts (issue 15), measured in one run: each encoding extracted from the bench models and applied to
a new base, beside the three-model graft, then the quality each encoding keeps.

    .venv/bin/python bench/bench_diffs.py                      # everything, best of 2, page cache warm
    .venv/bin/python bench/bench_diffs.py --repeat 3 --cold    # also the applies with their inputs evicted
    .venv/bin/python bench/bench_diffs.py --part quality       # the quality part alone (a few minutes)

The models (generated here, cached under .bench/diffs-*; nothing is downloaded):
  speed trio  three bf16 Llama-shaped checkpoints of about 0.9 GB each (8 layers, hidden 2048, vocab 32000):
              a base; a fine-tune whose delta is like a real SFT one (per tensor ||d|| / ||w|| drawn between 3e-3
              and 1e-2 before the bf16 rounding: a rank-8 part with heavy-tailed rows and columns, 80% of the
              energy, plus dense noise, then rounded to bf16 as a fine-tune is saved); a target that is the
              base drifted by 5% (a continuation).
  quality     (a) the trio's reconstruction errors, from the artifacts' manifests; (b) a small Llama (hidden 512,
              bf16, random weights) with the same kind of delta: KL of the applied graft's next-token
              distributions to the three-model graft's, beside KL(three-model graft || target), the diff's own
              effect; (c) the calibration family (examples/calibration/family.py, size "example", trained
              here): its fine-tune (a dense delta, ~17% of the weights) and a fine-tune trained like it at a
              thirtieth of the rate (~1%, the size of a real SFT delta), each applied to v2 (the near
              continuation), judged by the engine's evaluation (probe loss, KL to the fine-tune) and the task.

Every extraction and graft of the speed part is a fresh process (`graft diff extract`, `graft run`), run through
a launcher that times its imports and reports its own read bytes (/proc/self/io rchar); peak RSS is
/usr/bin/time's. Figures are the best of --repeat by wall time, with [min-max] ranges; the jobs take turns,
in reversed order every other round. Input digests are computed once beforehand (the DigestCache every graft
reads, kept under .bench/): what the first graft of a file pays is printed apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BENCH = os.path.join(ROOT, ".bench")
PY = sys.executable
DIGESTS = os.path.join(BENCH, "diffs-digests")
TRIO_VERSION = 1  # bump when the generator changes: the cached models are rebuilt
FAMILY_VERSION = 1
FAMILY_PY = os.path.join(ROOT, "examples", "calibration", "family.py")

# label -> `graft diff extract` flags
ENCODINGS = {
    "exact": ["--encoding", "exact"],
    "bf16": ["--encoding", "bf16"],
    "int8": ["--encoding", "int8"],
    "sign": ["--encoding", "sign"],
    "sparse-0.1": ["--encoding", "sparse", "--density", "0.1"],
    "sparse-0.02": ["--encoding", "sparse", "--density", "0.02"],
    "lowrank-16": ["--encoding", "lowrank", "--rank", "16"],
    "lowrank-64": ["--encoding", "lowrank", "--rank", "64"],
}
THREE = "three-model"
BEFORE = " BEFORE"  # a job run by the --baseline tree's engine

# A fresh process's graft, timed from inside: monotonic clock readings (CLOCK_MONOTONIC: one clock for every
# process) at its first line, after its imports and after main(), and its read bytes, on stderr's last line.
LAUNCH = r'''
import time
t_start = time.monotonic()
import json, sys
import torch  # noqa: F401  (what every graft imports first)
t_torch = time.monotonic()
from worker.cli import main
import worker.engine.pipeline.graft, worker.engine.pipeline.diff_extract  # noqa: F401,E401
t_imports = time.monotonic()
code = main(sys.argv[1:])
t_main = time.monotonic()
with open("/proc/self/io") as fh:
    io = dict(line.split(": ") for line in fh.read().splitlines())
sys.stderr.write("\nBENCH " + json.dumps({"t_start": t_start, "t_torch": t_torch, "t_imports": t_imports,
                                          "t_main": t_main, "rchar": int(io["rchar"])}) + "\n")
import worker.cli
getattr(worker.cli, "exit_now", sys.exit)(code)  # as the `graft` command ends (a --baseline tree may not)
'''


# The same commands in a fresh process with the engine's stages timed (seconds summed over the threads that ran
# them, each call's wall time: on a busy machine a thread's wait for a core counts too). Decode includes the
# artifact reads it makes; the kernel is the compute thread's arithmetic of each piece.
PROFILE = r"""
import importlib, inspect, json, sys, threading, time
from worker.cli import main
import worker.engine.compute.arithmetic as arithmetic
import worker.engine.diffs.sketch as sketch
import worker.engine.storage.local_files as local_files
from worker.engine.diffs.encodings import ENCODINGS
seconds, lock, active = {}, threading.Lock(), threading.local()
def wrap(owner, attr, key):
    orig = getattr(owner, attr)
    def timed(*a, **k):
        keys = getattr(active, "keys", None) or set()
        active.keys = keys
        if key in keys:  # a nested call of the same stage (lowrank handing a tensor to exact) counts once
            return orig(*a, **k)
        keys.add(key)
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            keys.discard(key)
            with lock:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
    setattr(owner, attr, timed)
for encoding in ENCODINGS.values():
    wrap(encoding, "decode_into", "decode")
    if hasattr(encoding, "patch"):  # the structured reads' decode (compute/patches.py)
        wrap(encoding, "patch", "decode")
    module = importlib.import_module(type(encoding).__module__)
    for name, cls in vars(module).items():
        if inspect.isclass(cls) and name.endswith("Encoder") and cls.__module__ == module.__name__:
            for attr in ("feed", "end_pass", "finish"):
                if hasattr(cls, attr):
                    wrap(cls, attr, "encode")
wrap(sketch.Sketcher, "add", "sketch")
wrap(local_files.LocalStore, "read_into", "file reads")
for attr in ("transfer", "apply_delta", "apply_patch"):
    wrap(arithmetic.Arithmetic, attr, "kernel")
code = main(sys.argv[1:])
sys.stderr.write("\nBENCH " + json.dumps(seconds) + "\n")
sys.exit(code)
"""


# The same commands in a fresh process, the CPU seconds (user + system, every thread of the process) spent in
# the streaming phase (stream_plan) measured around it: what a busy machine's wall clock cannot show, since a
# job's wall time there is mostly its wait for a core.
CPU_LAUNCH = r"""
import json, resource, sys
import worker.engine.compute.stream as stream
import worker.engine.pipeline.graft  # noqa: F401
from worker.cli import main
spent = []
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def timed(real):
    def run(*a, **k):
        c0 = cpu()
        try:
            return real(*a, **k)
        finally:
            spent.append(cpu() - c0)
    return run
stream.stream_plan = timed(stream.stream_plan)
for name, module in list(sys.modules.items()):
    if name.startswith("worker.engine") and getattr(module, "stream_plan", None) is not None and module is not stream:
        module.stream_plan = stream.stream_plan
code = main(sys.argv[1:])
sys.stderr.write("\nBENCH " + json.dumps({"stream_cpu_s": sum(spent)}) + "\n")
sys.exit(code)
"""


# --- models ----------------------------------------------------------------------------------------------

def realistic_delta(w, g, rel: float, *, rank: int = 8, lowrank_share: float = 0.8):
    """A float32 delta with ||d|| = rel * ||w||: for a matrix, a rank-`rank` part (decaying singular values,
    rows and columns scaled by log-normal factors: a few channels move much more, as in real fine-tunes)
    holding `lowrank_share` of the energy, plus dense Gaussian noise; a vector: noise alone."""
    import torch

    x = w.float()
    norm = float(x.norm()) * rel
    noise = torch.randn(x.shape, generator=g)
    if x.dim() < 2:
        return noise * (norm / max(float(noise.norm()), 1e-30))
    m, n = x.shape[0], x.numel() // x.shape[0]
    u = torch.randn(m, rank, generator=g) / (1.0 + torch.arange(rank, dtype=torch.float32))
    low = u @ torch.randn(rank, n, generator=g)
    low *= torch.exp(0.75 * torch.randn(m, 1, generator=g))
    low *= torch.exp(0.75 * torch.randn(1, n, generator=g))
    low = low.reshape(x.shape)
    low *= math.sqrt(lowrank_share) * norm / float(low.norm())
    noise *= math.sqrt(1 - lowrank_share) * norm / float(noise.norm())
    return low.add_(noise)


def realistic_finetune(base: dict, *, seed: int, rel_range=(3e-3, 1e-2)) -> dict:
    """Every float tensor moved by realistic_delta at a relative norm drawn log-uniformly in rel_range, then
    rounded to the tensor's dtype (bf16 rounding turns part of a small delta into +-1 ulp steps, as saving a
    real fine-tune does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = (math.log10(v) for v in rel_range)
    out = {}
    for name, w in base.items():
        if w.is_floating_point():
            rel = 10 ** (lo + (hi - lo) * float(torch.rand(1, generator=g)))
            w = (w.float() + realistic_delta(w, g, rel)).to(w.dtype)
        out[name] = w
    return out


def make_realistic_trio(root: str, shape, *, shards=(1, 2, 3)) -> dict[str, str]:
    """source_base, source_finetuned (realistic_finetune of it) and target_base (the base drifted by 5%),
    cached under `root` (rebuilt when TRIO_VERSION or the shape changes)."""
    from dataclasses import asdict

    stamp = {"version": TRIO_VERSION, "shape": asdict(shape), "shards": list(shards)}
    paths = {r: os.path.join(root, r) for r in ("source_base", "source_finetuned", "target_base")}
    stamp_file = os.path.join(root, "trio.json")
    if os.path.exists(stamp_file):
        with open(stamp_file) as fh:
            if json.load(fh) == stamp:
                return paths
    from worker.devtools.sample_models import chat_tokenizer_files, llama_state, perturb, save_checkpoint

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    base = llama_state(shape, seed=0)
    states = {"source_base": base, "source_finetuned": realistic_finetune(base, seed=1),
              "target_base": perturb(base, seed=2, scale=0.05)}
    for (role, state), n in zip(states.items(), shards, strict=True):
        cfg = shape.config(max_positions=4096 if role == "target_base" else 2048)
        save_checkpoint(paths[role], state, cfg, shards=n, reverse=role == "target_base",
                        tokenizer=chat_tokenizer_files(role), generation_config={"bos_token_id": 1,
                                                                                  "eos_token_id": 2})
    with open(stamp_file, "w") as fh:
        json.dump(stamp, fh)
    print(f"  (generated {root} in {time.perf_counter() - t0:.0f} s)")
    return paths


def weight_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def files_bytes(directories) -> int:
    return sum(os.path.getsize(f) for d in directories for f in weight_files(d))


# --- running and timing ----------------------------------------------------------------------------------

def warm(directories) -> None:
    for d in directories:
        for f in weight_files(d):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(16 << 20):
                    pass


def evict(directories) -> None:
    """The files' pages dropped from this machine's page cache (posix_fadvise DONTNEED: clean pages of these
    files only; other processes' cache is left alone). The host under this VM may still cache them."""
    os.sync()
    for d in directories:
        for f in weight_files(d):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def resident_share(directories) -> float | None:
    """Share of the files' bytes in the page cache (util-linux fincore), None where it is not there."""
    total = resident = 0
    for d in directories:
        for f in weight_files(d):
            try:
                out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", f],
                                     capture_output=True, text=True, check=True).stdout.split()
            except (OSError, subprocess.CalledProcessError):
                return None
            resident, total = resident + int(out[0]), total + int(out[1])
    return resident / total if total else None


def launched(args: list[str], tree: str = ROOT) -> dict:
    """`graft ARGS --json` in a fresh process (the engine of source tree `tree`): wall, peak RSS, its --json
    answer and the launcher's timings."""
    env = dict(os.environ, GRAFT_CACHE_DIR=DIGESTS, PYTHONPATH=tree)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        start = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file.name, PY, "-c", LAUNCH, *args,
                               "--json"], capture_output=True, text=True, env=env, cwd=tree)
        end = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(f"graft {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        peak_kb, user, system = rss_file.read().strip().splitlines()[-1].split()
    inner = json.loads(next(line for line in reversed(proc.stderr.splitlines()) if line.startswith("BENCH "))[6:])
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": end - start, "rss_gb": int(peak_kb) / 1e6, "cpu_s": float(user) + float(system),
            "answer": answer, "rchar": inner["rchar"],
            "start_s": inner["t_start"] - start, "torch_s": inner["t_torch"] - inner["t_start"],
            "imports_s": inner["t_imports"] - inner["t_start"], "main_s": inner["t_main"] - inner["t_imports"],
            "exit_s": end - inner["t_main"]}


def extract_cmd(trio: dict, label: str, out: str) -> list[str]:
    return ["diff", "extract", "--source-base", trio["source_base"], "--source-finetuned",
            trio["source_finetuned"], "--output", out, *ENCODINGS[label]]


def apply_cmd(trio: dict, artifact: str | None, out: str) -> list[str]:
    pair = ["--diff", artifact] if artifact else ["--source-base", trio["source_base"], "--source-finetuned",
                                                   trio["source_finetuned"]]
    return ["run", *pair, "--target-base", trio["target_base"], "--output", out]


def rounds(jobs: dict, repeat: int, prepare, tmp: str) -> dict[str, list[dict]]:
    """Each job `repeat` times, taking turns (reversed every other round, so a slow spell of this shared
    machine falls on all of them); `prepare(name)` before each run (sync, then warm or evict its inputs)."""
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for i in range(repeat):
        for name in (list(jobs) if i % 2 == 0 else list(jobs)[::-1]):
            out = os.path.join(tmp, f"out-{name}")
            shutil.rmtree(out, ignore_errors=True)
            prepare(name)
            runs[name].append(jobs[name](out))
            shutil.rmtree(out, ignore_errors=True)
    return runs


def best(runs: list[dict]) -> dict:
    b = dict(min(runs, key=lambda r: r["wall_s"]))
    b["wall_range"] = (min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs))
    if "stream_s" in b:
        b["stream_range"] = (min(r["stream_s"] for r in runs), max(r["stream_s"] for r in runs))
    return b


def span(r: tuple[float, float]) -> str:
    return f"[{r[0]:.2f}-{r[1]:.2f}]"


# --- the speed part ----------------------------------------------------------------------------------------

def prehash(directories) -> float:
    """Digests of the files into the graft's DigestCache (as the first graft of them would compute them);
    the seconds it took."""
    from worker.engine.storage.input_hashes import DigestCache

    cache = DigestCache(DIGESTS)
    t0 = time.perf_counter()
    for d in directories:
        for f in weight_files(d):
            cache.digest(f)
    cache.save()
    return time.perf_counter() - t0


def extraction(trio: dict, labels: list[str], repeat: int, tmp: str, keep: str | None = None
               ) -> tuple[dict, dict[str, str]]:
    """Each encoding extracted `repeat` times (fresh process, source pair warm); the last artifact of each kept
    (under `keep` when given, where an artifact already there is reused and its extraction not run)."""
    kept = {label: os.path.join(keep or tmp, f"artifact-{label}") for label in labels}
    if keep is not None:
        done = [label for label in labels if os.path.exists(os.path.join(kept[label], "diff-manifest.json"))]
        labels = [label for label in labels if label not in done]
        if done:
            print(f"  reused (extracted by an earlier run, {keep}): {', '.join(done)}")

    def job(label):
        def run(_out: str) -> dict:
            shutil.rmtree(kept[label], ignore_errors=True)
            r = launched(extract_cmd(trio, label, kept[label]))
            r["stream_s"] = r["answer"]["stats"]["seconds_streaming"]
            return r
        return run

    def prepare(_name: str) -> None:
        os.sync()
        warm([trio["source_base"], trio["source_finetuned"]])

    runs = rounds({label: job(label) for label in labels}, repeat, prepare, tmp)
    return {label: best(rs) for label, rs in runs.items()}, kept


def artifact_manifest(artifact: str) -> dict:
    with open(os.path.join(artifact, "diff-manifest.json")) as fh:
        return json.load(fh)


def stored_counts(manifest: dict) -> str:
    """How the artifact's tensors are held: the encoding's own, or exact where it fell back (totals.stored
    names the encoding chosen, which for lowrank includes matrices its meta says it stored exact)."""
    counts: dict[str, int] = {}
    for t in manifest["tensors"].values():
        fell_back = t["meta"].get("stored")  # lowrank's "exact" (sparse's `stored` is a count)
        how = fell_back if isinstance(fell_back, str) else t["stored"]
        counts[how] = counts.get(how, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def applying(trio: dict, artifacts: dict[str, str], repeat: int, tmp: str, *, cold: bool,
             baseline: str | None = None) -> dict:
    """The three-model graft and each artifact applied to the target, `repeat` rounds, fresh processes; with
    `baseline` (another source tree of graft), each job also run by that tree's engine, in the same rounds
    (labels suffixed BEFORE)."""
    inputs = {THREE: [trio["target_base"], trio["source_base"], trio["source_finetuned"]],
              **{label: [trio["target_base"], a] for label, a in artifacts.items()}}
    if baseline is not None:
        inputs.update({label + BEFORE: files for label, files in inputs.items()})

    def job(label):
        def run(out: str) -> dict:
            own = label.removesuffix(BEFORE)
            tree = baseline if label.endswith(BEFORE) and baseline is not None else ROOT
            r = launched(apply_cmd(trio, artifacts.get(own), out), tree)
            stats = r["answer"]["stats"]
            r.update(stream_s=stats["seconds_streaming"], stats=stats)
            return r
        return run

    residency: list[float] = []

    def prepare(name: str) -> None:
        os.sync()
        if cold:
            evict(inputs[name])
            share = resident_share(inputs[name])
            if share is not None:
                residency.append(min(1.0, share))
        else:
            warm(inputs[name])

    runs = rounds({label: job(label) for label in inputs}, repeat, prepare, tmp)
    result = {label: best(rs) for label, rs in runs.items()}
    for label, r in result.items():
        r["disk_bytes"] = files_bytes(inputs[label])
    if residency:
        result["_residency"] = max(residency)
    return result


def print_trio(trio: dict, exact_manifest: dict | None) -> None:
    size = {r: files_bytes([d]) for r, d in trio.items()}
    print("models: " + ", ".join(f"{r} {b / 1e9:.3f} GB" for r, b in size.items()))
    if exact_manifest is None:
        return
    rels = sorted(math.sqrt(t["norms"]["delta_sq"] / t["norms"]["base_sq"]) for t in
                  exact_manifest["tensors"].values() if t["norms"]["base_sq"] > 0)
    whole = math.sqrt(sum(t["norms"]["delta_sq"] for t in exact_manifest["tensors"].values())
                      / sum(t["norms"]["base_sq"] for t in exact_manifest["tensors"].values()))
    print(f"fine-tune's delta, ||f - s|| / ||s|| per tensor after the bf16 rounding (from the exact artifact's "
          f"norms): min {rels[0]:.2e}, median {statistics.median(rels):.2e}, max {rels[-1]:.2e}; whole model "
          f"{whole:.2e} ({len(rels)} tensors)")


def print_extraction(ext: dict, manifests: dict, finetuned_bytes: int) -> None:
    print(f"  {'encoding':<12} {'wall s':>7} {'[range]':<13} {'stream s':>8} {'CPU s':>6} {'RSS GB':>6} "
          f"{'artifact MB':>11} {'x smaller':>9} {'rel frob':>9} {'(max)':>9} {'max abs':>9}  stored")
    for label, r in ext.items():
        totals = r["answer"]["totals"]
        stored = stored_counts(manifests[label])
        print(f"  {label:<12} {r['wall_s']:>7.2f} {span(r['wall_range']):<13} {r['stream_s']:>8.2f} "
              f"{r['cpu_s']:>6.1f} {r['rss_gb']:>6.2f} {totals['encoded_bytes'] / 1e6:>11.1f} "
              f"{totals['ratio_to_finetuned']:>9.2f} {totals['rel_frobenius']:>9.2e} "
              f"{totals['rel_frobenius_max']:>9.2e} {totals['max_abs']:>9.2e}  "
              f"{stored}")
    print(f"  (x smaller: the fine-tune's {finetuned_bytes / 1e9:.3f} GB of tensors over the artifact's encoded "
          "bytes; rel frob: ||d - d^|| / ||d|| over the whole model, (max) the worst tensor's)")


def print_applies(app: dict, note: str) -> None:
    print(f"  {'job':<12} {'wall s':>7} {'[range]':<13} {'stream s':>8} {'[range]':<13} {'on disk GB':>10} "
          f"{'rchar GB':>8} {'stats GB':>8} {'RSS GB':>6} {'CPU s':>6} | {'stream':>6} {'wall':>6} | "
          f"{'computing':>9} {'wait reads':>10} {'wait writer':>11}")
    for label, r in app.items():
        if label.startswith("_"):
            continue
        thread = r["stats"]["compute_thread"]
        three = app[THREE + BEFORE] if label.endswith(BEFORE) else app[THREE]
        print(f"  {label:<12} {r['wall_s']:>7.2f} {span(r['wall_range']):<13} {r['stream_s']:>8.2f} "
              f"{span(r['stream_range']):<13} {r['disk_bytes'] / 1e9:>10.3f} {r['rchar'] / 1e9:>8.3f} "
              f"{r['stats']['bytes_read'] / 1e9:>8.3f} {r['rss_gb']:>6.2f} {r['cpu_s']:>6.1f} | "
              f"{three['stream_s'] / r['stream_s']:>5.2f}x {three['wall_s'] / r['wall_s']:>5.2f}x | "
              f"{thread['computing_s']:>9.2f} {thread['waiting_reads_s']:>10.2f} {thread['waiting_writer_s']:>11.2f}")
    print(f"  ({note}. stream / wall: the three-model graft's over this job's (above 1: this job is shorter). "
          "on disk: the inputs' file bytes (target + pair, or target + artifact); rchar: what the process read "
          "through read calls, imports included; stats GB: the manifest's bytes_read, which for an artifact "
          "counts the decoded float32 delta, not the bytes read. CPU s: user + system seconds of the whole process, "
          "imports included (less noisy than wall on a shared machine). computing / wait: the compute thread's "
          "seconds in the streaming phase.)")


def print_fixed(app: dict, torch_import: float, hash_times: dict) -> None:
    print(f"  `python -c 'import torch'` alone, best of 3: {torch_import:.2f} s")
    print(f"  {'job':<12} {'wall':>6} = {'start':>6} + {'torch':>6} + {'other imp':>9} + {'resolve':>7} + "
          f"{'stream':>6} + {'rest of run':>11} + {'CLI':>5} + {'exit':>5} | fixed share")
    for label, r in app.items():
        if label.startswith("_"):
            continue
        st = r["stats"]
        rest = st["seconds_total"] - st["seconds_streaming"]
        cli = r["main_s"] - st["seconds_resolving"] - st["seconds_total"]
        fixed = r["wall_s"] - st["seconds_streaming"]
        print(f"  {label:<12} {r['wall_s']:>6.2f} = {r['start_s']:>6.2f} + {r['torch_s']:>6.2f} + "
              f"{r['imports_s'] - r['torch_s']:>9.2f} + {st['seconds_resolving']:>7.2f} + "
              f"{st['seconds_streaming']:>6.2f} + {rest:>11.2f} + {cli:>5.2f} + {r['exit_s']:>5.2f} | "
              f"{fixed / r['wall_s']:>5.0%}")
    print("  (start: exec to the launcher's first line; torch / other imp: `import torch`, then worker.cli and the "
          "engine; resolve: the manifest's seconds_resolving (headers, configs, an artifact's manifest and shard "
          "digests); rest of run: seconds_total - seconds_streaming (side files, hashing joined, manifest "
          "commit); CLI: main() less the graft (parsing, the request, printing); exit: interpreter teardown.)")
    print("  digests the first graft of a file computes (sha256, cached after; measured here beforehand): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in hash_times.items()))
    runs = [r for k, r in app.items() if not k.startswith("_")]
    mean = {k: statistics.mean(r[k] for r in runs) for k in ("start_s", "imports_s", "exit_s", "wall_s")}
    print(f"  what would remove them: the imports ({mean['imports_s']:.2f} s a run here, torch most of it) are paid "
          "once by a long-lived process: the service's worker imports torch and the engine in its parent and forks "
          "each job (GRAFT_WORKER_PRELOAD), so a job starts without them; the interpreter's teardown "
          f"({mean['exit_s']:.2f} s, most of it torch's own: `import torch` alone takes about as long to exit) "
          "could go with os._exit once the manifest is committed and stdout flushed (the CLI has nothing left to "
          "do then); output hashing is streamed with the writes (inside the streaming phase, not a fixed cost); "
          "input and artifact hashing are remembered per file (the DigestCache), so only a file's first graft "
          "pays them.")


def profiled(args: list[str]) -> dict:
    env = dict(os.environ, GRAFT_CACHE_DIR=DIGESTS)
    proc = subprocess.run([PY, "-c", PROFILE, *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"profiled graft {' '.join(args[:2])} failed: {proc.stderr[-3000:]}")
    stages = json.loads(next(line for line in reversed(proc.stderr.splitlines()) if line.startswith("BENCH "))[6:])
    return {"stages": stages, "answer": json.loads(proc.stdout.strip().splitlines()[-1])}


def streaming_cpu(trio: dict, artifacts: dict[str, str], repeat: int, tmp: str, baseline: str | None) -> None:
    """Each apply's streaming-phase CPU seconds (CPU_LAUNCH), `repeat` rounds taking turns, best and range; with
    `baseline`, each also by that tree's engine."""
    trees = {"": ROOT, **({BEFORE: baseline} if baseline else {})}
    jobs = {label + suffix: (tree, apply_cmd(trio, artifacts.get(label), os.path.join(tmp, "cpu-out")))
            for suffix, tree in trees.items() for label in [THREE, *artifacts]}
    runs: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(repeat):
        for name in (list(jobs) if i % 2 == 0 else list(jobs)[::-1]):
            tree, cmd = jobs[name]
            shutil.rmtree(os.path.join(tmp, "cpu-out"), ignore_errors=True)
            os.sync()
            warm([trio["target_base"], trio["source_base"], trio["source_finetuned"], *artifacts.values()])
            env = dict(os.environ, GRAFT_CACHE_DIR=DIGESTS, PYTHONPATH=tree)
            proc = subprocess.run([PY, "-c", CPU_LAUNCH, *cmd, "--json"], capture_output=True, text=True, env=env,
                                  cwd=tree)
            if proc.returncode != 0:
                raise RuntimeError(f"graft {name} failed: {proc.stderr[-3000:]}")
            line = next(x for x in reversed(proc.stderr.splitlines()) if x.startswith("BENCH "))
            runs[name].append(json.loads(line[6:])["stream_cpu_s"])
    shutil.rmtree(os.path.join(tmp, "cpu-out"), ignore_errors=True)
    print(f"\n== 2c. the streaming phase's CPU seconds (user + system, all threads, measured around stream_plan in "
          f"the process), best of {repeat} [range], page cache warm")
    for name, values in runs.items():
        three = min(runs[THREE + BEFORE] if name.endswith(BEFORE) else runs[THREE])
        print(f"  {name:<20} {min(values):>6.2f} [{min(values):.2f}-{max(values):.2f}]  three-model / this "
              f"{three / min(values):>5.2f}x")


def where_time_goes(trio: dict, artifacts: dict[str, str], tmp: str) -> None:
    """One more run of each apply and of the exact extraction, its stages timed (PROFILE)."""
    print("\n== 5. where the streaming phase's time goes (one more warm run each, stages timed in the process: "
          "thread-seconds, summed over the threads that ran them)")
    print(f"  {'job':<20} {'stream s':>8} | {'file reads':>10} {'decode':>7} {'kernel':>7} {'sketch':>7} "
          f"{'encode':>7} | {'computing':>9} {'wait reads':>10} {'wait writer':>11}")
    jobs = {f"apply {THREE}": apply_cmd(trio, None, os.path.join(tmp, "prof-out")),
            **{f"apply {label}": apply_cmd(trio, a, os.path.join(tmp, "prof-out")) for label, a in artifacts.items()}}
    if "exact" in artifacts:
        jobs["extract exact"] = extract_cmd(trio, "exact", os.path.join(tmp, "prof-out"))
    for name, cmd in jobs.items():
        shutil.rmtree(os.path.join(tmp, "prof-out"), ignore_errors=True)
        os.sync()
        warm([trio["target_base"], trio["source_base"], trio["source_finetuned"], *artifacts.values()])
        r = profiled(cmd)
        st, stages = r["answer"]["stats"], r["stages"]
        thread = st.get("compute_thread")
        threads = (f"{thread['computing_s']:>9.2f} {thread['waiting_reads_s']:>10.2f} "
                   f"{thread['waiting_writer_s']:>11.2f}" if thread else f"{'-':>9} {'-':>10} {'-':>11}")
        cells = " ".join(f"{stages.get(k, 0.0):>{w}.2f}" for k, w in (("file reads", 10), ("decode", 7),
                                                                       ("kernel", 7), ("sketch", 7), ("encode", 7)))
        print(f"  {name:<20} {st['seconds_streaming']:>8.2f} | {cells} | {threads}")
    shutil.rmtree(os.path.join(tmp, "prof-out"), ignore_errors=True)
    print("  (file reads: preadv of the input files, the artifact's included; decode: the artifact's tensors decoded "
          "into the float32 delta the kernel reads, on the reader threads; kernel: the compute thread's arithmetic; "
          "sketch: the extraction's CountSketch of the source base and of the delta; encode: the encoder's feed, "
          "end_pass and finish.)")


def speed(args, tmp: str) -> dict:
    from worker.devtools.sample_models import LlamaShape

    shape = LlamaShape(vocab=32000, hidden=2048, layers=args.layers, intermediate=5632, heads=16, kv_heads=4)
    trio = make_realistic_trio(os.path.join(BENCH, f"diffs-l{args.layers}"), shape)
    labels = args.encodings
    hash_times = {"trio": prehash(trio.values())}
    print(f"\n== 1. extraction: `graft diff extract` per encoding, fresh process, source pair warm, best of "
          f"{args.repeat}")
    keep = os.path.join(BENCH, f"diffs-l{args.layers}-artifacts") if args.reuse_artifacts else None
    ext, artifacts = extraction(trio, labels, args.repeat, tmp, keep)
    manifests = {label: artifact_manifest(a) for label, a in artifacts.items()}
    print_trio(trio, manifests.get("exact"))
    print_extraction(ext, manifests, files_bytes([trio["source_finetuned"]]))
    for label, a in artifacts.items():
        hash_times[label] = prehash([a])
    print(f"\n== 2. apply: `graft run --diff ARTIFACT --target-base T` beside the three-model `graft run`, fresh "
          f"processes, best of {args.repeat}, page cache warm (each run's inputs read beforehand)")
    if args.cpu:
        streaming_cpu(trio, artifacts, args.repeat, tmp, args.baseline)
    if args.cpu_only:
        return {"extraction": ext}
    app = applying(trio, artifacts, args.repeat, tmp, cold=False, baseline=args.baseline)
    print_applies(app, "page cache warm")
    if args.cold:
        print(f"\n== 2b. apply with each run's input files evicted from the page cache first (posix_fadvise "
              f"DONTNEED after a sync; this VM's host may still cache them), best of {args.repeat}")
        cold = applying(trio, artifacts, args.repeat, tmp, cold=True, baseline=args.baseline)
        share = cold.pop("_residency", None)
        print_applies(cold, "inputs evicted" + (f"; at most {share:.1%} of a run's input bytes were still "
                                                f"resident when it started (fincore)" if share is not None else ""))
    print("\n== 3. the fixed costs of a graft process (warm runs above)")
    print_fixed(app, torch_import_seconds(), hash_times)
    verdict(app)
    if args.profile:
        where_time_goes(trio, artifacts, tmp)
    return {"extraction": ext, "apply": app}


def torch_import_seconds() -> float:
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([PY, "-c", "import torch"], check=True)
        times.append(time.monotonic() - t0)
    return min(times)


def verdict(app: dict) -> None:
    lines = []
    for label, r in app.items():
        if label.startswith("_") or label.startswith(THREE):
            continue
        three = app[THREE + BEFORE] if label.endswith(BEFORE) else app[THREE]
        ratio = three["stream_s"] / r["stream_s"]
        if label.startswith(("sparse", "lowrank")):
            lines.append(f"{label} streaming {ratio:.2f}x shorter ({'met' if ratio >= 2 else 'MISSED'}: >= 2x)")
        elif label.startswith("exact"):
            lines.append(f"{label} streaming {ratio:.2f}x of the three-model's ({'met' if ratio >= 0.95 else 'MISSED'}:"
                         " no slower, 5% slack for this shared machine)")
    print("  targets (issue 15, streaming phase): " + "; ".join(lines))


# --- the quality part --------------------------------------------------------------------------------------

def engine_settings():
    from worker.engine.config import EngineSettings

    return EngineSettings(cache_dir="", hash_inputs=False, eval_isolation="inline")


def extract_in_process(base: str, finetuned: str, label: str, out: str) -> dict:
    from worker.engine.diffs.request import DiffExtract, DiffExtractRequest
    from worker.engine.pipeline.diff_extract import extract_diff

    flags = ENCODINGS[label]
    encoding = {"encoding": flags[1]}
    for flag, value in zip(flags[2::2], flags[3::2], strict=True):
        encoding[flag.lstrip("-")] = float(value) if "." in value else int(value)
    spec = DiffExtract(source_base=base, source_finetuned=finetuned, encoding=encoding)
    return extract_diff(DiffExtractRequest(spec, out), engine_settings()).manifest


def graft_in_process(target: str, out: str, *, artifact: str | None = None, pair: tuple[str, str] | None = None):
    from worker.engine.pipeline.graft import run_graft
    from worker.engine.planning.options import GraftOptions
    from worker.engine.planning.recipe import Recipe
    from worker.engine.planning.request import GraftRequest

    base, finetuned = pair or ("", "")
    recipe = Recipe.single(base, finetuned, target, GraftOptions(alpha=1.0), diff=artifact)
    return run_graft(GraftRequest(recipe, out), settings=engine_settings())


def load_lm(directory: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def mean_kl(p_model, q_model, ids) -> float:
    """Mean over positions of KL(p || q) of the next-token distributions (float64)."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(p_model(input_ids=ids).logits.double(), -1)
        lq = torch.log_softmax(q_model(input_ids=ids).logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def quality_small_llama(labels: list[str], tmp: str) -> dict:
    """(b): the realistic delta on a small random bf16 Llama; function error of each encoding's graft against
    the three-model graft, on random token windows."""
    import torch

    from worker.devtools.sample_models import LlamaShape

    shape = LlamaShape(vocab=4096, hidden=512, layers=4, intermediate=1376, heads=8, kv_heads=4)
    trio = make_realistic_trio(os.path.join(BENCH, "diffs-small"), shape, shards=(1, 1, 1))
    ids = torch.randint(0, shape.vocab, (8, 128), generator=torch.Generator().manual_seed(5))
    ref_dir = os.path.join(tmp, "q-small-three")
    graft_in_process(trio["target_base"], ref_dir, pair=(trio["source_base"], trio["source_finetuned"]))
    ref, target = load_lm(ref_dir), load_lm(trio["target_base"])
    effect = mean_kl(ref, target, ids)
    size = files_bytes([trio["source_base"]]) / 1e6
    print(f"  (b) small Llama (hidden 512, 4 layers, vocab 4096, bf16, random weights, {size:.0f} MB) with the "
          "trio's kind of delta; 8 x 128 random tokens. The diff's own effect: KL(three-model graft"
          f" || target) = {effect:.3e} nats/token")
    print(f"      {'encoding':<12} {'x smaller':>9} {'rel frob':>9} {'KL(three || applied)':>21} {'/ effect':>9}  "
          "stored")
    found: dict = {}
    for label in labels:
        art, out = os.path.join(tmp, f"q-small-{label}"), os.path.join(tmp, f"q-small-out-{label}")
        manifest = extract_in_process(trio["source_base"], trio["source_finetuned"], label, art)
        totals, stored = manifest["totals"], stored_counts(manifest)
        graft_in_process(trio["target_base"], out, artifact=art)
        kl = mean_kl(ref, load_lm(out), ids)
        print(f"      {label:<12} {totals['ratio_to_finetuned']:>9.2f} {totals['rel_frobenius']:>9.2e} {kl:>21.3e} "
              f"{kl / effect:>9.2%}  {stored}")
        found[label] = {"rel": totals["rel_frobenius"], "ratio": kl / effect}
        shutil.rmtree(art, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return found


def load_family():
    name = "graft_calibration_family"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAMILY_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def family_models(size: str = "example") -> dict[str, str]:
    """v1, v2, ft of the calibration family, and ft_small: v1 fine-tuned as ft is, at a thirtieth of its rate
    (a delta of about 1% of the weights); trained once, cached under .bench/."""
    import copy

    import torch

    fam = load_family()
    root = os.path.join(BENCH, f"diffs-family-{size}")
    names = ("v1", "v2", "ft", "ft_small")
    paths = {n: os.path.join(root, n) for n in names}
    stamp_file = os.path.join(root, "family.json")
    if os.path.exists(stamp_file):
        with open(stamp_file) as fh:
            if json.load(fh) == {"version": FAMILY_VERSION, "size": size}:
                return paths
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    fam.train_family(root, size, members=("v2",))
    s = fam.SIZES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        data = fam.corpus("A", s.corpus_rows, s.seq_len, seed=0)
        model = fam.load(paths["v1"])
        small = copy.deepcopy(model).train()
        fam.train(small, fam.lm_batches(data, s.batch, seed=14, task=True), steps=s.ft_steps, lr=s.cont_lr / 30,
                  seed=4)
        fam.save(small, paths["ft_small"], chat=True)
    finally:
        torch.set_num_threads(threads)
    with open(stamp_file, "w") as fh:
        json.dump({"version": FAMILY_VERSION, "size": size}, fh)
    print(f"  (trained the calibration family into {root} in {time.perf_counter() - t0:.0f} s)")
    return paths


def relative_norm(base: str, finetuned: str) -> float:
    from safetensors.torch import load_file

    a, b = ({k: v.double() for f in weight_files(d) for k, v in load_file(f).items()} for d in (base, finetuned))
    num = sum(float((b[k] - a[k]).norm() ** 2) for k in a if k in b and a[k].shape == b[k].shape)
    return math.sqrt(num / sum(float(v.norm() ** 2) for v in a.values()))


def evaluated(output: str, target: str, finetuned: str) -> dict:
    """The engine's evaluation (what `graft run --evaluate` records) of `output` against the target and the
    real fine-tune, on the family's probe text and eight held-out task questions; plus the task score."""
    from worker.engine.checks.evaluation.evaluate import evaluate_graft
    from worker.engine.checks.evaluation.spec import EvaluateSpec
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    fam = load_family()
    spec = EvaluateSpec(probe_text=fam.probe_text(), prompts=[q for q, _ in fam.task_examples("heldout")[:8]],
                        max_new_tokens=2)
    models = [resolve_model(role, parse_uri(uri, field=role)) for role, uri in
              (("output", output), ("target_base", target), ("source_finetuned", finetuned))]
    try:
        ev = evaluate_graft(*models, spec, settings=engine_settings())
    finally:
        for m in models:
            m.store.close()
    return {"probe_loss": ev["probe"]["output"]["loss"], "kl": ev["kl_to_finetuned"]["mean"],
            "task": fam.task_score(output), "target_loss": ev["probe"]["target_base"]["loss"],
            "ft_loss": ev["probe"]["source_finetuned"]["loss"]}


def family_row(name: str, row: dict, totals: dict | None = None, stored: str = "") -> str:
    size = f"{totals['ratio_to_finetuned']:>9.2f} {totals['rel_frobenius']:>9.2e}" if totals else f"{'':>9} {'':>9}"
    return f"      {name:<16} {size} {row['probe_loss']:>10.4f} {row['kl']:>11.4f} {row['task']:>5.2f}  {stored}"


def quality_family(labels: list[str], tmp: str) -> dict:
    """(c): the calibration family's dense fine-tune and the small-rate one, each encoding applied to v2."""
    fam = load_family()
    paths = family_models()
    v1, v2 = paths["v1"], paths["v2"]
    print(f"  (c) calibration family (size example, float32, trained here); target v2 (near continuation): task "
          f"(share of held-out questions answered) v1 {fam.task_score(v1):.2f}, v2 {fam.task_score(v2):.2f}")
    found: dict = {}
    for ft_name in ("ft", "ft_small"):
        ft = paths[ft_name]
        rel = relative_norm(v1, ft)
        print(f"      fine-tune {ft_name}: ||ft - v1|| / ||v1|| = {rel:.3f}, its own task score "
              f"{fam.task_score(ft):.2f}")
        print(f"      {'graft onto v2':<16} {'x smaller':>9} {'rel frob':>9} {'probe loss':>10} {'KL(ft||out)':>11} "
              f"{'task':>5}  stored")
        alone = evaluated(v2, v2, ft)
        print(family_row("(v2 alone)", alone) + f"(the fine-tune's own probe loss {alone['ft_loss']:.4f})")
        out = os.path.join(tmp, f"q-fam-{ft_name}-three")
        graft_in_process(v2, out, pair=(v1, ft))
        rows = {THREE: evaluated(out, v2, ft)}
        print(family_row(THREE, rows[THREE]))
        shutil.rmtree(out, ignore_errors=True)
        for label in labels:
            art, out = os.path.join(tmp, f"q-fam-{label}"), os.path.join(tmp, f"q-fam-out-{label}")
            manifest = extract_in_process(v1, ft, label, art)
            graft_in_process(v2, out, artifact=art)
            rows[label] = {**evaluated(out, v2, ft), "rel_frobenius": manifest["totals"]["rel_frobenius"]}
            print(family_row(label, rows[label], manifest["totals"], stored_counts(manifest)))
            shutil.rmtree(art, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        found[ft_name] = {"rel": rel, "alone": alone, "rows": rows}
    return found


def kept_transfer(rows: dict, alone: dict, label: str) -> float:
    """Share of the three-model graft's move toward the fine-tune (KL(ft || v2) down to the graft's) that the
    applied artifact keeps."""
    gained = alone["kl"] - rows[THREE]["kl"]
    return (alone["kl"] - rows[label]["kl"]) / gained if gained else float("nan")


def explain(family: dict, small: dict, labels: list[str]) -> None:
    ft, small_ft = family["ft"], family["ft_small"]
    lossy = [x for x in labels if x != "exact"]
    kept = {name: {x: kept_transfer(f["rows"], f["alone"], x) for x in lossy} for name, f in family.items()}
    print("  kept transfer (share of the three-model graft's drop of KL(ft || out) from v2's that the applied "
          "artifact keeps):")
    for name in family:
        print(f"      {name:<9} " + ", ".join(f"{x} {kept[name][x]:.0%}" for x in lossy))
    print(f"  What the calibration family shows: its fine-tune moved v1 by {ft['rel']:.0%} of the weights' norm (a "
          "tiny model trained at a high rate, every element moved by Adam alike): a dense delta, nothing like a "
          "real SFT one. Sparse top-k keeps its largest elements as sign times one scale; on so dense a delta "
          "most of the energy is in the elements it drops (rel frob "
          + ", ".join(f"{x} {ft['rows'][x]['rel_frobenius']:.2f}" for x in lossy if x.startswith("sparse"))
          + ") and the transfer goes with it, as it should. ft_small, the same fine-tuning at a thirtieth of the "
          f"rate, moved v1 by {small_ft['rel']:.1%}, the size of a real SFT delta, but its delta is as dense "
          "(small is not sparse), so sparse fails on it too. The speed trio's and the small Llama's realistic "
          "delta concentrates its energy in a low-rank part with heavy-tailed rows and columns, like the "
          "deltas measured on large fine-tuned models; there the function error of a lossy encoding follows "
          "the square of its reconstruction error (KL(three || applied) / effect ~ rel frob^2 in (b): "
          + ", ".join(f"{x} {small[x]['ratio']:.2f} vs {small[x]['rel'] ** 2:.2f}" for x in lossy if x in small)
          + ").")


def quality(args, tmp: str, speed_result: dict | None) -> None:
    print("\n== 4. quality per encoding")
    if speed_result:
        print("  (a) the speed trio (realistic delta, bf16, 0.9 GB): reconstruction error in section 1's table "
              "(rel frob, max abs), measured while encoding")
    small = quality_small_llama(args.encodings, tmp)
    family = quality_family(args.encodings, tmp)
    explain(family, small, args.encodings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("speed", "quality", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=2, help="runs per job; the best is shown with the range")
    ap.add_argument("--layers", type=int, default=8, help="Llama layers of the speed trio (8: about 0.9 GB each)")
    ap.add_argument("--encodings", default=",".join(ENCODINGS), help=f"comma-separated, of {', '.join(ENCODINGS)}")
    ap.add_argument("--cold", action="store_true", help="also the applies with their inputs evicted from the "
                    "page cache")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip section 5 (one more run of "
                    "each apply, its stages timed)")
    ap.add_argument("--baseline", metavar="TREE", help="another source tree of graft (e.g. `git archive` of an "
                    "earlier commit): each apply also run by its engine, in the same rounds (before / after)")
    ap.add_argument("--reuse-artifacts", action="store_true", help="keep the extracted artifacts under "
                    ".bench/diffs-l<layers>-artifacts and reuse those there (their extraction is not re-timed)")
    ap.add_argument("--cpu", action="store_true", help="also each apply's streaming-phase CPU seconds (section "
                    "2c: what a busy machine's wall clock cannot show)")
    ap.add_argument("--cpu-only", action="store_true", help="section 2c alone after the extraction (implies --cpu)")
    args = ap.parse_args()
    args.cpu = args.cpu or args.cpu_only
    args.encodings = [e for e in args.encodings.split(",") if e]
    unknown = [e for e in args.encodings if e not in ENCODINGS]
    if unknown:
        ap.error(f"unknown encoding(s) {unknown}; known: {list(ENCODINGS)}")
    os.makedirs(BENCH, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="diffs-bench-", dir=BENCH)
    t0 = time.monotonic()
    print(f"bench_diffs: {os.cpu_count()} CPU(s) (shared with other work: figures vary between runs; the ranges "
          f"show by how much), torch threads default")
    try:
        result = speed(args, tmp) if args.part in ("speed", "both") else None
        if args.part in ("quality", "both"):
            quality(args, tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench_diffs done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
