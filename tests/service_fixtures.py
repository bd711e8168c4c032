"""Helpers for the service tests: a real uvicorn API and real RQ workers in subprocesses, pointed at the
test Redis (with a per-service key prefix and queue name, so nothing collides) and the moto S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx

from worker.devtools.loopback import free_port, wait_port


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendants_running(pid: int, marker: bytes) -> list[int]:
    """The descendants of `pid` whose command line holds `marker` (a child script's name)."""
    found = []
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                if marker in fh.read():
                    found.append(child)
        except OSError:
            continue
    return found


KEYS = {"alpha": "key-alpha-123", "beta": "key-beta-456"}
WEBHOOK_SECRET = "whsec-test"


def compare_dirs(expected: str, got: dict[str, bytes]) -> None:
    """Every file of a local run_graft output (but the manifest and model card, which name URIs and times)
    equals the service's, byte for byte."""
    names = sorted(n for n in os.listdir(expected) if n not in ("graft-manifest.json", "README.md"))
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        with open(os.path.join(expected, name), "rb") as fh:
            assert got.get(name) == fh.read(), f"{name} differs from the local run"


def read_local(directory: str) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as fh:
            out[name] = fh.read()
    return out


def read_s3(endpoint: str, uri: str) -> dict[str, bytes]:
    from worker.engine.storage.s3 import s3_client

    client = s3_client(endpoint)
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    out = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        out[obj["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def local_graft(paths: dict[str, str], output: str, **options) -> str:
    from worker.engine import GraftOptions, GraftRequest, run_graft
    from worker.service.settings import Settings

    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], output,
                           GraftOptions(**options))
    run_graft(request, settings=Settings(cache_dir=""))
    return output


class Service:
    """One API process and any number of workers sharing one environment."""

    def __init__(self, redis_url: str, root: str, *, s3_endpoint: str | None = None, **env) -> None:
        tag = uuid.uuid4().hex[:10]
        self.root = root
        os.makedirs(os.path.join(root, "outputs"), exist_ok=True)
        self.env = {
            **os.environ,
            "GRAFT_REDIS_URL": redis_url,
            "GRAFT_KEY_PREFIX": f"test-{tag}:",
            "GRAFT_QUEUE_NAME": f"test-{tag}",
            "GRAFT_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items()),
            "GRAFT_ALLOWED_ROOTS": root,
            "GRAFT_OUTPUT_URI": f"file://{root}/outputs",
            "GRAFT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "GRAFT_WEBHOOK_ALLOW_PRIVATE": "1",
            "GRAFT_WEBHOOK_BACKOFF": "0.2",
            "GRAFT_HF_ENABLED": "0",
            "GRAFT_CACHE_DIR": "",
            "GRAFT_LOG_LEVEL": "WARNING",
            # Tenant limits are tested on their own (test_service_hostile.py); elsewhere they would only
            # make tests that submit many jobs depend on their order.
            "GRAFT_TENANT_RATE_PER_MINUTE": "0",
            "GRAFT_TENANT_MAX_UNFINISHED_JOBS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        if s3_endpoint:
            self.env["GRAFT_S3_ENDPOINT_URL"] = s3_endpoint
        self.env.update({k: str(v) for k, v in env.items()})
        self.prefix = self.env["GRAFT_KEY_PREFIX"]
        self.queue = self.env["GRAFT_QUEUE_NAME"]
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.port = 0
        self.url = ""

    def start_api(self) -> Service:
        self.port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(self.port)],
                                env=self.env, start_new_session=True)
        self.procs.append(proc)
        wait_port(self.port, 30)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def start_worker(self, **env) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"],
                                env={**self.env, **{k: str(v) for k, v in env.items()}}, start_new_session=True)
        self.procs.append(proc)
        self.workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker and its work horse at once, as a machine failure would (RQ puts the horse in a
        session of its own, so the process group alone would miss it)."""
        pids = [proc.pid, *_descendants(proc.pid)]
        assert len(pids) >= 2, "expected a work horse under the worker"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._cleanup_redis()

    def _cleanup_redis(self) -> None:
        """Leave the shared Redis as we found it: our prefixed keys, our RQ queue and its jobs."""
        r = self.store().r
        ids = set()
        for key in r.scan_iter(match=f"{self.prefix}tenant:*"):
            ids.update(i.decode() for i in r.zrange(key, 0, -1))
        keys = list(r.scan_iter(match=f"{self.prefix}*")) + [f"rq:job:{i}" for i in ids]
        for i in ids:  # a split job's tasks (worker/service/task_records.py task_id)
            keys += list(r.scan_iter(match=f"rq:job:{i}-*"))
        keys += list(r.scan_iter(match=f"rq:*:{self.queue}"))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])

    def client(self, tenant: str | None = "alpha") -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def store(self):
        import redis

        from worker.service.job_store import JobStore

        return JobStore(redis.Redis.from_url(self.env["GRAFT_REDIS_URL"]), self.prefix)


def job_body(paths: dict[str, str], **extra) -> dict:
    return {"source_base": f"file://{paths['source_base']}", "source_finetuned": f"file://{paths['source_finetuned']}",
            "target_base": f"file://{paths['target_base']}", **extra}


def wait_job(client: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled"),
             timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = client.get(f"/v1/jobs/{job_id}").json()
        if doc["status"] in until:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {doc['status']} after {timeout}s: {doc}")


def submit_and_wait(client: httpx.Client, path: str, body: dict, kind: str, headers: dict | None = None,
                    timeout: float = 60) -> dict:
    """POST a job of `kind` at `path` (202, its Location), waited for until it succeeded: the job."""
    resp = client.post(path, json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}" and job["kind"] == kind
    done = wait_job(client, job["id"], timeout=timeout)
    assert done["status"] == "succeeded", done
    return done
