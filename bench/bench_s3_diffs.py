"""Diff artifacts on a bandwidth-bound S3 link: the three-model graft against extracting once and applying,
S3 -> S3 on bench/s3_rig.py's rig (s3rver in its own network namespace, every TCP connection capped by the
kernel), with the link's floors measured in the same run (issue 15, "Applied cheaply"; issue 17's rig).

    .venv/bin/python bench/bench_s3_diffs.py                 # 5 MB/s per connection, best of 2
    .venv/bin/python bench/bench_s3_diffs.py --rate 25 --repeat 3 --encodings sparse

Inputs: three plain bf16 Llama checkpoints of ~0.36 GB, one file each (source base, a fine-tune of it whose
delta is like a real SFT one: ~0.3-1% of each tensor's norm, mostly low-rank, then rounded to bf16; a target
base drifted 5% from the source base), generated once under .bench/ and uploaded to the rig uncapped. Each
round, taking turns (the order reversed every other round, since this machine is shared):

    floors     (a) the inputs read with GRAFT_REMOTE_LANES ranged lanes each, all at once: the three models for
               the three-model graft, the target and the artifact for an applied one; (b) an object of the
               output's size uploaded with GRAFT_S3_PARTS_IN_FLIGHT parts in flight (and, apart, what s3rver's
               CompleteMultipartUpload costs: it concatenates the parts, reading and writing them all)
    three      `graft run --source-base s3://... --source-finetuned s3://... --target-base s3://...`
    applied    `graft run --diff s3://<artifact> --target-base s3://... --output s3://...` per encoding
    verify     the artifact's shards read and hashed as applying first does (diffs/artifact.py verify_shards,
               in this process, through the engine's own S3 store)

`graft diff extract` (S3 -> S3) of each encoding runs first, best of --repeat too. Each job is a fresh CLI
process against the rig (GRAFT_S3_ENDPOINT_URL), timed whole (start-up included) with its CPU; its stats are
read from the output's graft-manifest.json. Target (issue 15): sparse / lowrank applied >= 2x faster whole
job than the three-model graft on this link; exact no slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from s3_rig import ACCESS_KEY, BENCH, MB, SECRET_KEY, Floor, S3Rig, terminate_on_signals  # noqa: E402

PY = sys.executable
TRIO_VERSION = 1
BUCKET = "bench"
ROLES = ("source_base", "source_finetuned", "target_base")
ENCODINGS = {"exact": ["--encoding", "exact"], "sparse": ["--encoding", "sparse", "--density", "0.1"],
             "lowrank": ["--encoding", "lowrank", "--rank", "16"]}


# --- the models ---

def realistic_delta(w, g, rel: float, *, rank: int = 8, lowrank_share: float = 0.8):
    """A float32 delta with ||d|| = rel * ||w||: for a matrix, a rank-`rank` part (decaying singular values, a few
    rows and columns moving much more: log-normal scales) holding `lowrank_share` of the energy, plus dense
    Gaussian noise; for a vector, noise alone. SFT deltas look like this: small, mostly low-rank, not sparse."""
    import torch

    x = w.float()
    norm = float(x.norm()) * rel
    noise = torch.randn(x.shape, generator=g)
    if x.dim() < 2:
        return noise * (norm / max(float(noise.norm()), 1e-30))
    m, n = x.shape[0], x.numel() // x.shape[0]
    low = (torch.randn(m, rank, generator=g) / (1.0 + torch.arange(rank, dtype=torch.float32))) @ \
        torch.randn(rank, n, generator=g)
    low *= torch.exp(0.75 * torch.randn(m, 1, generator=g))
    low *= torch.exp(0.75 * torch.randn(1, n, generator=g))
    low *= math.sqrt(lowrank_share) * norm / float(low.norm())
    noise *= math.sqrt(1 - lowrank_share) * norm / float(noise.norm())
    return low.reshape(x.shape).add_(noise)


def make_trio(root: str, layers: int, vocab: int) -> dict[str, str]:
    """The three checkpoints under `root` (made once; remade when the version or the shape changes)."""
    from worker.devtools.sample_models import LlamaShape, chat_tokenizer_files, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=vocab, hidden=2048, layers=layers, intermediate=5632, heads=16, kv_heads=4)
    stamp = {"version": TRIO_VERSION, "layers": layers, "vocab": vocab}
    paths = {r: os.path.join(root, r) for r in ROLES}
    stamp_file = os.path.join(root, "trio.json")
    if os.path.exists(stamp_file):
        with open(stamp_file) as fh:
            if json.load(fh) == stamp:
                return paths
    import torch

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    base = llama_state(shape, seed=0)
    g = torch.Generator().manual_seed(1)
    finetuned = {}
    for name, w in base.items():
        rel = 10 ** (math.log10(3e-3) + math.log10(10 / 3) * float(torch.rand(1, generator=g)))  # 0.3% to 1%
        finetuned[name] = (w.float() + realistic_delta(w, g, rel)).to(w.dtype) if w.is_floating_point() else w
    states = {"source_base": base, "source_finetuned": finetuned, "target_base": perturb(base, seed=2, scale=0.05)}
    for role, state in states.items():
        save_checkpoint(paths[role], state, shape.config(), tokenizer=chat_tokenizer_files(role),
                        generation_config={"bos_token_id": 1, "eos_token_id": 2})
    with open(stamp_file, "w") as fh:
        json.dump(stamp, fh)
    print(f"(generated {root} in {time.perf_counter() - t0:.0f} s)")
    return paths


def weights_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".safetensors"))


# --- running things ---

# `graft` itself (worker.cli:main), timed from inside: torch's import, the CLI's, and main (threads joined).
WRAPPED = r"""
import json, sys, time
t0 = time.monotonic()
import torch  # noqa: F401  (what every graft imports first)
t1 = time.monotonic()
from worker.cli import main
t2 = time.monotonic()
try:
    code = main(sys.argv[1:])
finally:
    sys.stderr.write("\nBENCH " + json.dumps({"torch_s": t1 - t0, "imports_s": t2 - t1,
                                              "main_s": time.monotonic() - t2}) + "\n")
sys.exit(code)
"""


def launched(args: list[str], env: dict) -> dict:
    """A fresh `graft` process: whole wall seconds, its parts (torch's import, main), CPU seconds (user + system),
    peak RSS, and its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", tf.name, PY, "-c", WRAPPED, *args],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"graft {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        user, system, rss_kb = tf.read().strip().splitlines()[-1].split()
    inside = json.loads(next(ln for ln in reversed(proc.stderr.splitlines()) if ln.startswith("BENCH "))[6:])
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "rss_gb": int(rss_kb) / 1e6, "stdout": proc.stdout,
            **inside}


def read_json(rig: S3Rig, key: str) -> dict:
    return json.loads(rig.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def fresh_cache(label: str) -> str:
    """An empty GRAFT_CACHE_DIR for a first apply: a worker's cache that has not seen this artifact (the apply
    verifies every shard and keeps its copy, as a worker does)."""
    path = os.path.join(BENCH, "s3diffs-first", label)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def graft_job(rig: S3Rig, args: list[str], out_prefix: str, env_extra: dict | None = None) -> dict:
    """One `graft run` to s3://bench/<out_prefix>: its figures and its manifest's stats; the output deleted."""
    env = rig.env()
    env.update({"GRAFT_CACHE_DIR": "", **(env_extra or {})})
    with rig.watch() as w:
        r = launched(["run", *args, "--output", f"s3://{BUCKET}/{out_prefix}", "--json"], env)
    manifest = read_json(rig, f"{out_prefix}/graft-manifest.json")
    r["stats"] = manifest["stats"]
    r["weights_sha256"] = {f["path"]: f["sha256"] for f in manifest["output"]["files"]
                           if f["path"].endswith(".safetensors")}
    r["connections"], r["sharing"] = w.most, w.sharing
    rig.delete_prefix(BUCKET, out_prefix)
    return r


def extract_job(rig: S3Rig, label: str, out_prefix: str) -> dict:
    env = dict(rig.env(), GRAFT_CACHE_DIR="")
    with rig.watch() as w:
        r = launched(["diff", "extract", "--source-base", f"s3://{BUCKET}/in/source_base", "--source-finetuned",
                      f"s3://{BUCKET}/in/source_finetuned", "--output", f"s3://{BUCKET}/{out_prefix}",
                      *ENCODINGS[label], "--json"], env)
    r["manifest"] = read_json(rig, f"{out_prefix}/diff-manifest.json")
    r["stats"] = r["manifest"]["stats"]
    r["connections"], r["sharing"] = w.most, w.sharing
    return r


def verify_artifact(rig: S3Rig, prefix: str, cache_dir: str | None = None) -> dict:
    """What applying costs before it plans anything: the artifact's shards read and hashed through the engine's
    S3 store, as open_artifact does (in this process: the engine's code, without the CLI's start-up).
    `cache_dir`: the digests remembered there per object version (URI, size, ETag), as a worker's are."""
    from worker.engine.diffs.artifact import read_manifest, verify_shards
    from worker.engine.diffs.shard_cache import shard_cache_for
    from worker.engine.storage.input_hashes import DigestCache
    from worker.engine.storage.stores import open_store
    from worker.engine.storage.uris import parse_uri

    uri = f"s3://{BUCKET}/{prefix}"
    t0, cpu0 = time.perf_counter(), rig.cpu()
    store = open_store(parse_uri(uri), rig.endpoint)
    try:
        manifest = read_manifest(store, uri)
        kept = shard_cache_for(cache_dir or "", 4 << 30)  # the verified copies a worker's cache keeps
        for fd in verify_shards(store, manifest, uri, DigestCache(cache_dir) if cache_dir else None, kept).values():
            os.close(fd)
    finally:
        store.close()
    cpu = [b - a for a, b in zip(cpu0, rig.cpu(), strict=True)]
    return {"wall_s": time.perf_counter() - t0, "shards": len(manifest.shards),
            "bytes": sum(s.size for s in manifest.shards), "cpu_here": cpu[0], "cpu_server": cpu[1]}


def torch_import_s() -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "import torch, worker.engine"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


# --- printing ---

def span(values: list[float]) -> str:
    return f"{min(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall_s"])


def floor_line(label: str, floors: list[Floor]) -> str:
    b = min(floors, key=lambda f: f.seconds)
    return (f"  {label:<44} {span([f.seconds for f in floors])} s  {b.mb_per_s:6.1f} MB/s  CPU-s {b.cpu_client:4.1f} "
            f"here + {b.cpu_server:4.1f} s3rver  {b.connections} conns ({b.sharing} sharing a class)")


def job_parts(r: dict) -> dict[str, float]:
    """A job's whole time split: start (torch's and the CLI's imports), resolving (an artifact's verification
    included), streaming, the rest of the graft before the commit, the commit (waiting for the uploads, s3rver's
    concatenation of each shard's parts, the manifest), the interpreter's own start and exit."""
    st = r["stats"]
    total = st.get("seconds_total", st["seconds_streaming"])
    resolving = st.get("seconds_resolving", 0.0)
    return {"start": r["torch_s"] + r["imports_s"], "resol": resolving, "stream": st["seconds_streaming"],
            "+tot": total - st["seconds_streaming"], "commit": r["main_s"] - resolving - total,
            "exit": r["wall_s"] - r["torch_s"] - r["imports_s"] - r["main_s"]}


def job_line(label: str, runs: list[dict]) -> str:
    b = best(runs)
    st = b["stats"]
    ct = st.get("compute_thread", {})
    parts = " ".join(f"{v:6.2f}" for v in job_parts(b).values())
    return (f"  {label:<22} {span([r['wall_s'] for r in runs])} | {parts} | {st['bytes_read'] / MB:7.0f} | "
            f"{ct.get('computing_s', 0):5.2f} {ct.get('waiting_reads_s', 0):6.2f} {ct.get('waiting_writer_s', 0):5.2f}"
            f" | {b['cpu_s']:5.1f} {b['rss_gb']:5.2f} | {b['connections']:3} ({b['sharing']})")


JOB_HEADER = (f"  {'job':<22} {'whole s (range)':>20} | {'start':>6} {'resol':>6} {'stream':>6} {'+tot':>6} "
              f"{'commit':>6} {'exit':>6} | {'MB read':>7} | {'comp':>5} {'w-read':>6} {'w-wri':>5} | {'CPU-s':>5} "
              f"{'RSS':>5} | conns (sharing)")


def report(args, res: dict, sizes: dict, startup: list[float]) -> None:
    labels = args.encodings
    link = f", {args.link_rate:g} MB/s for the whole link" if args.link_rate else ""
    print(f"\n== floors of the link ({args.rate:g} MB/s per connection and direction{link}), best (range) of "
          f"{args.repeat}")
    print(floor_line(f"(a) 3 inputs x {args.lanes} lanes", res["floor_three"]))
    for label in labels:
        print(floor_line(f"(a) target + {label} artifact x {args.lanes} lanes", res[f"floor_{label}"]))
    print(floor_line(f"(b) upload {sizes['output'] / MB:.0f} MB, {args.parts} parts in flight", res["floor_up"]))
    complete = [f.seconds - max(r.t_end for r in f.requests) for f in res["floor_up"]]
    print(f"      of which s3rver's CompleteMultipartUpload (it concatenates the parts): {span(complete)} s")

    print(f"\n== extraction S3 -> S3 (`graft diff extract`), best (range) of {args.repeat}")
    print(f"  {'encoding':<10} {'whole s (range)':>20} | {'stream':>6} {'MB read':>7} | {'artifact MB':>11} "
          f"{'x smaller':>9} | {'rel err':>7} | CPU-s")
    for label in labels:
        runs = res[f"extract_{label}"]
        b = best(runs)
        tot = b["manifest"]["totals"]
        print(f"  {label:<10} {span([r['wall_s'] for r in runs])} | {b['stats']['seconds_streaming']:6.2f} "
              f"{b['stats']['bytes_read'] / MB:7.0f} | {sizes[label] / MB:11.1f} "
              f"{sizes['finetuned'] / sizes[label]:9.1f} | {tot.get('rel_frobenius', 0):7.4f} | {b['cpu_s']:5.1f}")

    print(f"\n== the graft S3 -> S3, fresh process each, best (range) of {args.repeat}")
    print("  (best run's whole time split: start = torch's and the CLI's imports; resol = resolving, an artifact's "
          "verification\n   included; stream = the streaming phase; +tot = the rest of the graft before its commit; "
          "commit = waiting\n   for the uploads, s3rver's CompleteMultipartUpload, the manifest; exit = the "
          "interpreter's start and exit.\n   comp / w-read / w-wri: the compute thread computing, waiting for "
          "reads, waiting for the writer)")
    print(JOB_HEADER)
    rows = [("three-model", "three", "floor_three")] + [(f"applied {x}", f"apply_{x}", f"floor_{x}") for x in labels]
    rows += [(f"applied {x} L={args.budget_lanes}", f"apply_{x}_budget", f"floor_{x}") for x in labels
             if f"apply_{x}_budget" in res]
    rows += [(f"applied {x} again", f"apply_{x}_again", f"floor_{x}") for x in labels if f"apply_{x}_again" in res]
    for label, key, _floor in rows:
        print(job_line(label, res[key]))
    print(f"  (`import torch, worker.engine` alone, a fresh process: {span(startup)} s)")

    print("\n== verification before applying (every artifact shard read and hashed; the bytes kept as the local "
          "copy the stream reads: the artifact crosses the link once)")
    for label in labels:
        v = res[f"verify_{label}"]
        b = min(v, key=lambda r: r["wall_s"])
        share = b["wall_s"] / best(res[f"apply_{label}"])["wall_s"]
        laned = min(f.seconds for f in res[f"floor_art_{label}"])
        print(f"  {label:<10} {span([r['wall_s'] for r in v])} s for {b['bytes'] / MB:.1f} MB in {b['shards']} "
              f"shard(s) ({b['bytes'] / b['wall_s'] / MB:.1f} MB/s: one connection per shard)  = {share:.0%} of the "
              f"applied job's whole time; the artifact alone through {args.lanes} lanes: {laned:.2f} s")
    if "exact" in labels:
        same = best(res["apply_exact"])["weights_sha256"] == best(res["three"])["weights_sha256"]
        print(f"  exact applied: weights {'byte-identical to' if same else 'DIFFERENT from'} the three-model graft's "
              "(sha256 of every output shard)")

    three = best(res["three"])["wall_s"]
    up = min(f.seconds for f in res["floor_up"])
    print("\n== ratios (whole process, best runs)")
    for label, key, floor in rows:
        job = best(res[key])["wall_s"]
        bound = max(min(f.seconds for f in res[floor]), up)
        speed = f"three / this = {three / job:4.2f}x" if key != "three" else " " * 20
        print(f"  {label:<22} {speed}   this / max(floors a, b) = {job / bound:4.2f}  (floor {bound:.2f} s)")
    for key in [f"apply_{x}" for x in labels] + [f"apply_{x}_again" for x in labels if f"apply_{x}_again" in res]:
        label = key[len("apply_"):]
        ratio = three / best(res[key])["wall_s"]
        exact = label.startswith("exact")  # exact and exact_again: no slower; the others: 2x
        goal, ok = (1.0, ratio >= 0.95) if exact else (2.0, ratio >= 2.0)
        print(f"  target: {label} applied {'no slower than' if exact else '>= 2x faster than'} the "
              f"three-model graft: {ratio:.2f}x -> {'met' if ok else 'NOT met'} (goal {goal:g}x)")


# --- the run ---

def round_of(rig: S3Rig, args, r: int, res: dict, sizes: dict, objects: dict) -> None:
    """One of each measurement, in an order reversed every other round."""
    labels = args.encodings
    three_inputs = [objects[role] for role in ROLES]
    ins = {role: f"s3://{BUCKET}/in/{role}" for role in ROLES}
    lanes_env = {"GRAFT_REMOTE_LANES": str(args.lanes), "GRAFT_S3_PARTS_IN_FLIGHT": str(args.parts)}
    steps = [
        ("floor_three", lambda: rig.read_floor(three_inputs, args.lanes)),
        ("floor_up", lambda: rig.upload_floor(BUCKET, f"floor/up-{r}", sizes["output"], args.parts, trace=True)),
        ("three", lambda: graft_job(rig, ["--source-base", ins["source_base"], "--source-finetuned",
                                          ins["source_finetuned"], "--target-base", ins["target_base"]],
                                    f"out/three-{r}", lanes_env)),
    ]
    for label in labels:
        art = f"s3://{BUCKET}/art/{label}"
        steps += [
            (f"floor_{label}", lambda x=label: rig.read_floor([objects["target_base"], objects[x]], args.lanes)),
            (f"apply_{label}", lambda x=label, a=art: graft_job(rig, ["--diff", a, "--target-base",
                                                                      ins["target_base"]], f"out/{x}-{r}",
                                                                dict(lanes_env, GRAFT_CACHE_DIR=fresh_cache(x)))),
            (f"verify_{label}", lambda x=label: verify_artifact(rig, f"art/{x}")),
            (f"floor_art_{label}", lambda x=label: rig.read_floor([objects[x]], args.lanes)),
        ]
        if args.again:  # the artifact's shards verified and kept before (a worker's GRAFT_CACHE_DIR): not read again
            cache = os.path.join(BENCH, "s3diffs-digests", label)

            def again(x=label, a=art, cache=cache):
                shutil.rmtree(cache, ignore_errors=True)
                verify_artifact(rig, f"art/{x}", cache)  # the first apply's verification, not timed here
                return graft_job(rig, ["--diff", a, "--target-base", ins["target_base"]], f"out/{x}-again-{r}",
                                 dict(lanes_env, GRAFT_CACHE_DIR=cache))
            steps.append((f"apply_{label}_again", again))
        if args.budget_lanes and label != "exact":
            steps.append((f"apply_{label}_budget", lambda x=label, a=art: graft_job(
                rig, ["--diff", a, "--target-base", ins["target_base"]], f"out/{x}-b-{r}",
                dict(lanes_env, GRAFT_REMOTE_LANES=str(args.budget_lanes)))))
    if r % 2:
        steps.reverse()
    for key, fn in steps:
        t0 = time.perf_counter()
        res.setdefault(key, []).append(fn())
        print(f"  round {r + 1}: {key:<22} {time.perf_counter() - t0:6.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=5.0, help="MB/s per connection and direction")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; each figure is the best, with the range")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=22528, help="with --layers 2: 0.36 GB per model")
    ap.add_argument("--encodings", type=lambda s: s.split(","), default=list(ENCODINGS),
                    help="comma-separated, of " + ",".join(ENCODINGS))
    ap.add_argument("--lanes", type=int, default=8, help="GRAFT_REMOTE_LANES, for graft and floor (a)")
    ap.add_argument("--parts", type=int, default=8, help="GRAFT_S3_PARTS_IN_FLIGHT, for graft and floor (b)")
    ap.add_argument("--budget-lanes", type=int, default=24,
                    help="also apply sparse/lowrank with this many lanes per input: the three-model graft's "
                         "connections, on one input (0: skip)")
    ap.add_argument("--again", action="store_true",
                    help="also apply each artifact again with its shards' digests remembered (GRAFT_CACHE_DIR, "
                         "per object version): the artifact applied to one more base, as a worker does")
    ap.add_argument("--link-rate", type=float, default=0.0,
                    help="MB/s of the whole link in each direction, shared by all connections (0: none, as issue "
                         "17's rig): a machine's NIC in front of a store that caps each connection")
    ap.add_argument("--class-bits", type=int, default=12,
                    help="the rig's HTB classes: one per value of the client port's low bits (8: issue 17's rig; "
                         "more: two connections sharing a class, each at half the rate, rarer)")
    args = ap.parse_args()
    terminate_on_signals()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    os.makedirs(BENCH, exist_ok=True)
    trio = make_trio(os.path.join(BENCH, f"s3diffs-l{args.layers}-v{args.vocab}"), args.layers, args.vocab)
    sizes = {"output": weights_bytes(trio["target_base"]), "finetuned": weights_bytes(trio["source_finetuned"])}
    with S3Rig(class_bits=args.class_bits) as rig:
        endpoint = rig.start(args.rate * MB, args.link_rate * MB or None)
        rig.create_bucket(BUCKET)
        with rig.uncapped():
            for role in ROLES:
                rig.upload_dir(trio[role], BUCKET, f"in/{role}")
        objects = {role: rig.objects(BUCKET, f"in/{role}") for role in ROLES}
        link = f", {args.link_rate:g} MB/s for the whole link" if args.link_rate else ", no cap on the whole link"
        print(f"rig: s3rver at {endpoint} in namespace {rig.ns}, {args.rate:g} MB/s per connection and direction"
              f"{link} ({1 << args.class_bits} HTB classes); inputs 3 x {sizes['output'] / 1e9:.2f} GB bf16 "
              f"(one file each); GRAFT_REMOTE_LANES={args.lanes}, GRAFT_S3_PARTS_IN_FLIGHT={args.parts}")
        res: dict[str, list] = {}
        for r in range(args.repeat):
            for label in args.encodings:
                t0 = time.perf_counter()
                run = extract_job(rig, label, f"art/{label}" if r == 0 else f"art-{label}-{r}")
                res.setdefault(f"extract_{label}", []).append(run)
                if r:
                    rig.delete_prefix(BUCKET, f"art-{label}-{r}")
                print(f"  round {r + 1}: extract_{label:<14} {time.perf_counter() - t0:6.1f} s", flush=True)
        for label in args.encodings:
            objects[label] = rig.objects(BUCKET, f"art/{label}")
            sizes[label] = sum(size for _b, _k, size in objects[label])
        startup = []
        for r in range(args.repeat):
            round_of(rig, args, r, res, sizes, objects)
            startup.append(torch_import_s())
        report(args, res, sizes, startup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
