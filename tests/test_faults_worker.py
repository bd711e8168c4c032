"""Workers under faults, with real processes: a redis-server of our own (AOF on) killed and restarted under
an idle worker and under a running job, and workers SIGKILLed (with their work horse) at random points.

`make soak` runs more kill trials: GRAFT_SOAK_TRIALS (default 2 here: one with a local output, one with an
S3 output) and GRAFT_SOAK_SEED.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
import redis
from service_fixtures import Service, _descendants, compare_dirs, job_body, local_graft, read_local, read_s3

from worker.devtools.local_redis import redis_server_binary
from worker.devtools.loopback import free_port, wait_port

# Slowed-down blocks so that faults land mid-job; short lease and backoff so that recoveries are quick.
SLOW = {"GRAFT_BLOCK_BYTES": 4096, "GRAFT_JOB_BLOCK_DELAY": 0.03, "GRAFT_LEASE_SECONDS": 2,
        "GRAFT_MONITOR_INTERVAL": 0.3, "GRAFT_REDIS_RETRY_MAX": 0.5, "GRAFT_REDIS_TIMEOUT": 2}
TERMINAL = ("succeeded", "failed", "cancelled")
SHARD = "50KB"


class RedisServer:
    """A redis-server of our own, on a fixed port and data directory so that a restart finds its AOF."""

    def __init__(self, directory: str) -> None:
        self.binary = redis_server_binary()
        if self.binary is None:
            pytest.skip("no redis-server binary")
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # appendfsync always: a SIGKILL loses nothing, so what the test checks is the worker, not Redis's fsync.
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10)
        deadline = time.time() + 10
        while True:  # the AOF is loaded before Redis answers commands
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(str(tmp_path / "redis-data"))
    os.makedirs(server.dir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _env_service(redis_url: str, root: str, trio: dict, s3_endpoint: str | None = None) -> Service:
    return Service(redis_url, root, s3_endpoint=s3_endpoint,
                   GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}", **SLOW)


def _start_worker_logged(svc: Service, log_path: str) -> subprocess.Popen:
    """A worker like Service.start_worker, with its stderr kept for the test to read."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=svc.env, stderr=log,
                                start_new_session=True)
    svc.procs.append(proc)
    svc.workers.append(proc)
    return proc


def _record(svc: Service, job_id: str) -> dict | None:
    """The job record read from Redis directly (the API is not under test here), None while Redis is down."""
    try:
        return svc.store().get(job_id)
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def _wait_record(svc: Service, job_id: str, until=TERMINAL, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    doc = None
    while time.time() < deadline:
        doc = _record(svc, job_id) or doc
        if doc and doc["status"] in until:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {until} after {timeout}s: {doc}")


def _wait_mid_stream(svc: Service, job_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = _record(svc, job_id)
        p = (doc or {}).get("progress") or {}
        if doc and doc["status"] == "running" and p.get("bytes_written", 0) > 0 and p.get("fraction", 1) < 0.5:
            return doc
        time.sleep(0.03)
    raise AssertionError("the job never got mid-stream")


def _submit(svc: Service, body: dict, timeout: float = 20) -> str:
    """POST a job, retried while the API answers 5xx (it may still be reconnecting after an outage)."""
    deadline = time.time() + timeout
    with svc.client() as c:
        while True:
            resp = c.post("/v1/jobs", json=body)
            if resp.status_code == 202:
                return resp.json()["id"]
            assert resp.status_code >= 500 and time.time() < deadline, resp.text
            time.sleep(0.2)


def _wait_idle(svc: Service, timeout: float = 30) -> None:
    """Until a worker has registered with RQ and waits on the queue."""
    r = svc.store().r
    deadline = time.time() + timeout
    while not any(r.hget(key.decode(), "state") == b"idle" for key in r.smembers(f"rq:workers:{svc.queue}")):
        assert time.time() < deadline, "no worker became idle"
        time.sleep(0.1)


def _outage(server: RedisServer, seconds: float) -> None:
    server.kill()
    time.sleep(seconds)
    server.start()


def _types(svc: Service, job_id: str) -> list[str]:
    return [e["type"] for e in svc.store().events(job_id)]


def test_job_reporting_rides_out_an_outage(own_redis):
    """In the job process: progress and cancel checks skip an unreachable Redis without waiting (the graft
    goes on), the record catches up when Redis is back, and a terminal status waits for Redis, up to a bound."""
    import threading
    import uuid

    from worker.engine.pipeline.graft import Progress
    from worker.service.job_store import ACTIVE, JobStore
    from worker.service.jobs import _Reporter, _wait
    from worker.service.settings import Settings

    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:10]}:", redis_retry_max=0.3, redis_wait_seconds=20)
    store = JobStore(redis.Redis.from_url(own_redis.url, socket_timeout=2), settings.key_prefix)
    job_id = "job_outage"
    store.r.hset(store.job_key(job_id), mapping={"status": b'"validating"', "attempt": b"1"})
    reporter = _Reporter(store, job_id, settings, attempt=1)

    own_redis.kill()
    t0 = time.monotonic()
    for i in range(50):
        reporter.progress(Progress("streaming", bytes_written=i, bytes_total=100))
        reporter._cancel_checked = 0.0  # a cancel check on every block
        assert reporter.should_cancel() is False
    assert time.monotonic() - t0 < 1.0, "an outage must not slow the graft down"

    own_redis.start()
    time.sleep(0.4)  # past the reporter's backoff
    reporter.progress(Progress("streaming", bytes_written=60, bytes_total=100))
    assert store.status(job_id) == "running", "the phase missed during the outage is written once Redis is back"
    assert store.get(job_id)["progress"]["bytes_written"] == 60

    own_redis.kill()
    threading.Timer(1.0, own_redis.start).start()
    t0 = time.monotonic()
    assert _wait(settings, "a test", store.transition, job_id, ACTIVE, "succeeded") == "running"
    assert time.monotonic() - t0 >= 0.9 and store.status(job_id) == "succeeded"

    own_redis.kill()
    bounded = settings.model_copy(update={"redis_wait_seconds": 0.5})
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        _wait(bounded, "a test", store.get, job_id)
    assert time.monotonic() - t0 < 2


def test_redis_restarted_mid_job_the_job_still_succeeds(own_redis, trio, tmp_path):
    expected = local_graft(trio, str(tmp_path / "expected"), shard_size=SHARD)
    svc = _env_service(own_redis.url, str(tmp_path), trio)
    try:
        svc.start_api()
        worker = svc.start_worker()
        job_id = _submit(svc, job_body(trio, options={"shard_size": SHARD}))
        _wait_mid_stream(svc, job_id)
        _outage(own_redis, 1.0)  # SIGKILL, then a restart that reads the AOF back
        done = _wait_record(svc, job_id)
        assert done["status"] == "succeeded", done
        # Survived, not retried: the lease lapsed while Redis was down, yet no monitor took the job for dead.
        assert done["attempt"] == 1, done
        types = _types(svc, job_id)
        assert "worker_lost" not in types and "retry" not in types and types.count("started") == 1, types
        compare_dirs(expected, read_local(done["result"]["uri"].removeprefix("file://")))
        assert worker.poll() is None, "the worker lives on"
    finally:
        svc.stop()


def test_worker_outlives_redis_outages_idle_and_mid_job(own_redis, trio, tmp_path):
    svc = _env_service(own_redis.url, str(tmp_path), trio)
    log_path = str(tmp_path / "worker.log")
    try:
        svc.start_api()
        worker = _start_worker_logged(svc, log_path)
        _wait_idle(svc)
        _outage(own_redis, 2.0)  # idle: RQ's blocking dequeue loses its connection
        assert worker.poll() is None, "an outage while idle must not end the worker"
        after_idle = _submit(svc, job_body(trio))
        assert _wait_record(svc, after_idle)["status"] == "succeeded"

        running = _submit(svc, job_body(trio))
        _wait_mid_stream(svc, running)
        _outage(own_redis, 3.0)  # longer than the 2 s lease: it lapses on Redis's clock
        done = _wait_record(svc, running)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
        assert worker.poll() is None, "an outage under a running job must not end the worker"
        later = _submit(svc, job_body(trio))
        assert _wait_record(svc, later)["status"] == "succeeded", "the worker takes jobs after the outage"

        own_redis.kill()  # SIGTERM while Redis is down: the worker still stops at once
        time.sleep(0.5)
        t0 = time.time()
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(10) == 0 and time.time() - t0 < 6  # on a loaded machine 3 s was passed
    finally:
        if own_redis.proc.poll() is not None:
            own_redis.start()
        svc.stop()
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        log = fh.read()
    assert "Traceback" not in log, log
    # Once per outage per process (the worker, its RQ scheduler, the job process), not once per retry.
    assert 3 <= log.count("Redis unreachable") <= 3 * 3, log
    assert log.count("could not connect to Redis") == 0, log


# --- SIGKILL at random points -----------------------------------------------------------------------------------

def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and whatever runs under it (its work horse, if one is running at that instant)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def _check_local(done: dict, expected: str) -> None:
    final = done["output"].removeprefix("file://")
    parent = os.path.dirname(final)
    leftovers = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(final)}.graft-tmp-")]
    if done["status"] == "succeeded":
        compare_dirs(expected, read_local(final))
        assert leftovers == [], f"temp directories left behind: {leftovers}"
    else:
        assert not os.path.exists(final) or os.listdir(final) == [], "a failed job left a visible output"


def _check_s3(done: dict, expected: str, endpoint: str, bucket: str, prefix: str) -> None:
    from worker.engine.storage.s3 import s3_client

    got = read_s3(endpoint, done["output"])
    if done["status"] == "succeeded":
        assert ".graft-pending" not in got
        compare_dirs(expected, got)
    else:
        assert "graft-manifest.json" not in got, "a failed job left a visible output"
    uploads = s3_client(endpoint).list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], f"orphan multipart uploads: {uploads}"


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_workers_killed_at_random_points(redis_url, s3_endpoint, s3_bucket, trio, tmp_path):
    trials = int(os.environ.get("GRAFT_SOAK_TRIALS", "2"))
    rng = random.Random(int(os.environ.get("GRAFT_SOAK_SEED", "20240611")))
    expected = local_graft(trio, str(tmp_path / "expected"), shard_size=SHARD)
    svc = _env_service(redis_url, str(tmp_path), trio, s3_endpoint=s3_endpoint)
    outcomes = []
    try:
        svc.start_api()
        worker = svc.start_worker()
        # An uninterrupted job first: it warms the worker up, and how long it ran bounds where the kills land.
        warm = _wait_record(svc, _submit(svc, job_body(trio, options={"shard_size": SHARD})))
        assert warm["status"] == "succeeded"
        span = _seconds(warm["started_at"], warm["finished_at"]) + 0.5
        for trial in range(trials):
            s3 = trial % 3 == 1  # a third of the trials; the second of all, so that `make test`'s two have one
            body = job_body(trio, options={"shard_size": SHARD})
            if s3:
                body["output"] = f"s3://{s3_bucket}/trial-{trial}"
            job_id = _submit(svc, body)
            delay = rng.uniform(0, span * 1.2)
            time.sleep(delay)
            horse = bool(_descendants(worker.pid))
            _kill_tree(worker)
            killed = time.time()
            worker = svc.start_worker()
            # A kill between RQ's dequeue and its fork leaves the job to RQ's intermediate-queue cleanup (minutes).
            done = _wait_record(svc, job_id, timeout=200)
            outcomes.append((trial, round(delay, 2), horse, done["status"], done["attempt"],
                             round(time.time() - killed, 1)))
            assert done["status"] in ("succeeded", "failed"), (trial, delay, done)
            if done["status"] == "failed":
                assert done["error"] and done["error"]["code"], done
            if s3:
                _check_s3(done, expected, s3_endpoint, s3_bucket, f"trial-{trial}/")
            else:
                _check_local(done, expected)
    finally:
        svc.stop()
    print(f"kill trials over a {span:.1f} s job (trial, kill after s, job process seen, status, attempt, "
          f"s from the kill to the end): {outcomes}")
