"""GET /v1/jobs/{id} under load: one uvicorn process (`graft serve`) against a load generator in a second
process (asyncio, raw keep-alive HTTP/1.1 sockets) on loopback. Target: >= 1500 req/s, p99 < 25 ms.

    .venv/bin/python bench/bench_api.py [--seconds 10] [--connections 32]

With --list-status, GET /v1/jobs (one page of 20) over one tenant's 10,000 jobs instead: unfiltered, by a
rare status (20 failed jobs spread among succeeded ones: what a scan of the records pays most for) and by
the common one, each from one connection by default. A filtered page should cost about an unfiltered one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.devtools.loopback import free_port, wait_port  # noqa: E402


async def _conn(port: int, request: bytes, stop_at: float, warm_until: float, lat: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while True:
        t = time.perf_counter()
        if t >= stop_at:
            break
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        done = time.perf_counter()
        if not head.startswith(b"HTTP/1.1 200"):
            errors.append(head[:40])
        if t >= warm_until:
            lat.append(done - t)
    writer.close()


def load(port: int, path: str, key: str, seconds: float, connections: int) -> None:
    """Runs in the load-generator process; prints one line of figures."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n").encode()
    lat: list[float] = []
    errors: list = []
    warm = 1.0

    async def main():
        start = time.perf_counter()
        await asyncio.gather(*[_conn(port, request, start + warm + seconds, start + warm, lat, errors)
                               for _ in range(connections)])

    asyncio.run(main())
    lat.sort()
    n = len(lat)
    print(f"requests={n} errors={len(errors)} rps={n / seconds:.0f} p50_ms={lat[n // 2] * 1e3:.2f} "
          f"p99_ms={lat[int(n * 0.99)] * 1e3:.2f} max_ms={lat[-1] * 1e3:.2f}", flush=True)


LIST_JOBS, LIST_RARE_EVERY = 10_000, 500
LIST_PATHS = ("/v1/jobs?limit=20", "/v1/jobs?limit=20&status=failed", "/v1/jobs?limit=20&status=succeeded")


def _doc(job_id: str, status: str) -> dict:
    from worker.service.job_store import now_iso

    return {"id": job_id, "object": "graft.job", "status": status, "created_at": now_iso(),
            "started_at": now_iso(), "finished_at": None, "source_base": "s3://models/a",
            "source_finetuned": "s3://models/b", "target_base": "s3://models/c",
            "output": f"s3://grafts/{job_id}", "options": {"alpha": 1.0, "vocab": "extend"},
            "metadata": {"team": "bench"}, "webhook_url": None, "attempt": 1, "max_attempts": 3,
            "progress": {"phase": "streaming", "tensors_done": 120, "tensors_total": 291,
                         "bytes_read": 3 << 30, "bytes_written": 1 << 30, "bytes_total": 16 << 30,
                         "fraction": 0.0625, "eta_seconds": 80.0},
            "result": None, "error": None}


def _seed(store, list_status: bool) -> str:
    """The job the GET bench reads, or the tenant's 10,000 jobs of the listing bench."""
    from worker.service.job_store import new_job_id

    if not list_status:
        job_id = new_job_id()
        store.create(_doc(job_id, "running"), "bench")
        return f"/v1/jobs/{job_id}"
    for n in range(LIST_JOBS):
        store.create(_doc(new_job_id(), "failed" if n % LIST_RARE_EVERY == 0 else "succeeded"), "bench")
    return ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=None, help="default 32, or 1 with --list-status")
    ap.add_argument("--list-status", action="store_true", help="time GET /v1/jobs?status= against unfiltered")
    ap.add_argument("--load", nargs=3, metavar=("PORT", "PATH", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        load(int(args.load[0]), args.load[1], args.load[2], args.seconds, args.connections or 32)
        return 0

    import redis

    from worker.service.job_store import JobStore

    tmp = tempfile.mkdtemp(prefix="graft-bench-api-")
    procs = []
    try:
        rport = free_port()
        procs.append(subprocess.Popen([shutil.which("redis-server"), "--port", str(rport), "--save", "",
                                       "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_port(rport)
        redis_url = f"redis://127.0.0.1:{rport}/0"
        key, prefix = "bench-key", f"bench-{uuid.uuid4().hex[:8]}:"
        store = JobStore(redis.Redis.from_url(redis_url), prefix)
        get_path = _seed(store, args.list_status)
        store.r.close()
        port = free_port()
        env = {**os.environ, "GRAFT_REDIS_URL": redis_url, "GRAFT_API_KEYS": f"{key}:bench",
               "GRAFT_KEY_PREFIX": prefix}
        procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], env=env,
                                      start_new_session=True))
        wait_port(port)
        connections = args.connections or (1 if args.list_status else 32)
        for path in LIST_PATHS if args.list_status else (get_path,):
            print(f"one uvicorn process on :{port}; GET {path}"
                  f"{f' ({LIST_JOBS} jobs in the tenant)' if args.list_status else ''}; {connections} keep-alive "
                  f"connections for {args.seconds}s (after 1s warm-up) from a second process", flush=True)
            subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds), "--connections",
                            str(connections), "--load", str(port), path, key], check=True)
        return 0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
