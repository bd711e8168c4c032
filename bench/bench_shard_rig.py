"""One graft job split by output shard, run by 1, 2 and 4 worker processes on a bandwidth-bound S3 link
(bench/s3_rig.py: s3rver in its own network namespace, every TCP connection capped by the kernel), S3 -> S3
(issue 18).

    .venv/bin/python bench/bench_shard_rig.py                       # 2 MB/s per connection
    .venv/bin/python bench/bench_shard_rig.py --rate 4 --workers 1,2,4,8

Inputs: three bf16 Llama-shaped checkpoints (~170 MB each, generated once under .bench/shard-rig/), uploaded
to the rig uncapped; the output in >= 6 shards (--shard-size). The service is the real one (an API process,
`graft worker` processes, the machine's Redis: tests/service_fixtures.py Service); each worker reads every input
with --lanes ranged lanes and uploads --parts parts at once, so one worker moves (3 x lanes) x rate in and
parts x rate out, and N workers N times that while the link (not the CPU) is the limit.

    one task    the same job with GRAFT_SHARD_MIN_BYTES above its size: the one-task graft, its bytes the reference
    N workers   the job split (GRAFT_SHARD_MIN_BYTES=1), timed from submission to succeeded; speed-up = the
                split on one worker's time / N workers' time; the shards' sha256 (from the manifest, computed
                as they were written) against the one-task graft's
    killed      2 workers; one is SIGKILLed (with its work horse) while its shard streams; the other one's
                monitor sees the lease lapse (--lease), RQ's retry runs the shard again: when the loss was seen,
                the job's time, the bytes

CPU seconds of the server and of the whole machine (from /proc/stat) are printed beside each run: the link is
the limit while they stay well under the cores available.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from s3_rig import BENCH, MB, S3Rig, terminate_on_signals  # noqa: E402

BUCKET = "bench"
ROLES = ("source_base", "source_finetuned", "target_base")
MODELS_VERSION = 1


def make_models(root: str, layers: int) -> dict[str, str]:
    from worker.devtools.sample_models import LlamaShape, chat_tokenizer_files, llama_state, perturb, save_checkpoint

    shape = LlamaShape(vocab=8192, hidden=1024, layers=layers, intermediate=2816, heads=8, kv_heads=4)
    paths = {r: os.path.join(root, r) for r in ROLES}
    stamp = {"version": MODELS_VERSION, "layers": layers}
    stamp_file = os.path.join(root, "models.json")
    if os.path.exists(stamp_file):
        with open(stamp_file) as fh:
            if json.load(fh) == stamp:
                return paths
    base = llama_state(shape, seed=0)
    states = {"source_base": base, "source_finetuned": perturb(base, seed=1, scale=0.01),
              "target_base": perturb(base, seed=2, scale=0.05)}
    for role, state in states.items():
        save_checkpoint(paths[role], state, shape.config(), tokenizer=chat_tokenizer_files(role),
                        generation_config={"bos_token_id": 1, "eos_token_id": 2})
    with open(stamp_file, "w") as fh:
        json.dump(stamp, fh)
    return paths


def machine_cpu() -> float:
    with open("/proc/stat") as fh:
        cols = fh.readline().split()[1:]
    busy = sum(int(c) for i, c in enumerate(cols) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def wait_workers(svc, n: int, timeout: float = 120) -> None:
    from rq import Worker

    deadline = time.time() + timeout
    while time.time() < deadline:
        if len([w for w in Worker.all(connection=svc.store().r) if svc.queue in w.queue_names()]) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{n} workers did not start")


def shard_digests(rig: S3Rig, prefix: str) -> dict[str, str]:
    manifest = json.loads(rig.client().get_object(Bucket=BUCKET, Key=f"{prefix}/graft-manifest.json")["Body"].read())
    return {f["path"]: f["sha256"] for f in manifest["output"]["files"] if f["path"] != "README.md"}


def run_job(svc, rig: S3Rig, uris: dict, prefix: str, shard_size: str, *, kill=None) -> dict:
    from service_fixtures import wait_job

    body = {**uris, "output": f"s3://{BUCKET}/{prefix}", "options": {"shard_size": shard_size}}
    cpu0, server0 = machine_cpu(), rig.cpu()[1]
    t0 = time.time()
    with svc.client() as c:
        r = c.post("/v1/jobs", json=body)
        r.raise_for_status()
        job_id = r.json()["id"]
        killed_at = kill(svc, job_id) if kill is not None else None
        done = wait_job(c, job_id, timeout=1800)
        events = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
    wall = time.time() - t0
    if done["status"] != "succeeded":
        raise RuntimeError(f"job {job_id}: {done['status']} {done.get('error')}")
    out = {"wall_s": wall, "cpu_s": machine_cpu() - cpu0, "server_cpu_s": rig.cpu()[1] - server0,
           "tasks": sum(1 for e in events if e["type"] == "task_started"),
           "digests": shard_digests(rig, prefix), "bytes_read": done["result"]["stats"]["bytes_read"]}
    if killed_at is not None:
        lost = [e for e in events if e["type"] == "worker_lost"]
        out["lost"] = [e.get("task") for e in lost]
        out["seen_after_s"] = _at(lost[0]) - killed_at if lost else None
    return out


def kill_mid_shard(svc, job_id: str) -> float:
    """SIGKILL the worker (and its work horse) whose shard task is streaming, a block of it written."""
    from rq import Worker

    from worker.service.task_records import TaskRecords

    r = svc.store().r
    key = TaskRecords(r, svc.prefix).key(job_id, "tasks:progress")
    deadline = time.time() + 600
    while time.time() < deadline:
        for w in Worker.all(connection=r):
            current = w.get_current_job_id() or ""
            raw = r.hget(key, current.removeprefix(f"{job_id}-"))
            doc = json.loads(raw) if raw else {}
            # A block written and more to come (a shard is a few blocks: its fraction moves in steps).
            if current.startswith(f"{job_id}-s") and doc.get("phase") == "streaming" and 0 < doc["fraction"] < 0.9:
                proc = next((p for p in svc.workers if p.pid == w.pid), None)
                if proc is not None:
                    svc.kill(proc)
                    return time.time()
        time.sleep(0.05)
    raise RuntimeError("no shard task caught mid-stream")


def service(redis_url: str, rig: S3Rig, root: str, args, **env):
    from service_fixtures import Service

    rig_env = rig.env({})
    env = {"GRAFT_REMOTE_LANES": args.lanes, "GRAFT_S3_PARTS_IN_FLIGHT": args.parts,
           "GRAFT_LEASE_SECONDS": args.lease, "GRAFT_CACHE_DIR": "", "GRAFT_HASH_INPUTS": "0",
           "GRAFT_SHARD_QUEUED_PER_TENANT": max(2, max(args.workers)),
           **{k: rig_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "NO_PROXY")},
           **env}
    svc = Service(redis_url, root, s3_endpoint=rig.endpoint, **env)
    svc.start_api()
    return svc


def trial(redis_url, rig, root, args, uris, label, workers, *, kill=None, **env) -> dict:
    svc = service(redis_url, rig, root, args, **env)
    try:
        for _ in range(workers):
            svc.start_worker()
        wait_workers(svc, workers)
        return run_job(svc, rig, uris, f"out/{label}", args.shard_size, kill=kill)
    finally:
        svc.stop()
        rig.delete_prefix(BUCKET, f"out/{label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2.0, help="MB/s per connection and direction")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard-size", default="25MB")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--workers-runs", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-workers-runs: only the one-task reference and the kill trial")
    parser.add_argument("--redis-url", default=os.environ.get("GRAFT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    terminate_on_signals()
    models = make_models(os.path.join(BENCH, "shard-rig"), args.layers)
    root = os.path.join(BENCH, "shard-rig", "service")
    os.makedirs(root, exist_ok=True)
    with S3Rig() as rig:
        rig.start(args.rate * MB)
        rig.create_bucket(BUCKET)
        with rig.uncapped():
            for role in ROLES:
                rig.upload_dir(models[role], BUCKET, f"in/{role}")
        uris = {role: f"s3://{BUCKET}/in/{role}" for role in ROLES}
        print(f"rig: s3rver in {rig.ns}, {args.rate:g} MB/s per connection and direction; {args.lanes} lanes per "
              f"input, {args.parts} parts in flight; {os.cpu_count()} CPUs")
        one = trial(args.redis_url, rig, root, args, uris, "one", 1, GRAFT_SHARD_MIN_BYTES=10**15)
        print(f"one task        {one['wall_s']:6.1f} s   cpu {one['cpu_s']:5.1f} s (server {one['server_cpu_s']:.1f})  "
              f"{len([p for p in one['digests'] if p.endswith('.safetensors')])} shards, "
              f"{one['bytes_read'] / 1e6:.0f} MB read")
        base = None
        for n in args.workers if args.workers_runs else ():
            got = trial(args.redis_url, rig, root, args, uris, f"split{n}", n, GRAFT_SHARD_MIN_BYTES=1)
            base = base or got["wall_s"] * (n if n == 1 else 1)
            same = got["digests"] == one["digests"]
            print(f"split, {n} worker{'s' if n > 1 else ' '} {got['wall_s']:6.1f} s   cpu {got['cpu_s']:5.1f} s "
                  f"(server {got['server_cpu_s']:.1f})  speed-up {base / got['wall_s']:.2f}x "
                  f"({base / got['wall_s'] / n:.2f} x N)  {got['tasks']} tasks  bytes {'=' if same else '!='} one task")
        killed = trial(args.redis_url, rig, root, args, uris, "killed", 2, kill=kill_mid_shard, GRAFT_SHARD_MIN_BYTES=1)
        same = killed["digests"] == one["digests"]
        print(f"killed, 2 -> 1  {killed['wall_s']:6.1f} s   lost {killed['lost']}, seen {killed['seen_after_s']:.1f} s "
              f"after the SIGKILL (lease {args.lease:g} s)  {killed['tasks']} tasks  "
              f"bytes {'=' if same else '!='} one task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
