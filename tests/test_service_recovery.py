"""Running jobs under stress, with real worker subprocesses on slowed-down blocks: a cancel mid-stream
leaves nothing behind, and a worker killed with SIGKILL mid-stream is retried to a byte-identical result."""

from __future__ import annotations

import os
import time

import pytest
from conftest import upload_dir
from service_fixtures import Service, compare_dirs, job_body, local_graft, read_s3, wait_job

SLOW = {"GRAFT_BLOCK_BYTES": 4096, "GRAFT_JOB_BLOCK_DELAY": 0.06, "GRAFT_LEASE_SECONDS": 2,
        "GRAFT_MONITOR_INTERVAL": 0.3}


@pytest.fixture
def slow(redis_url, s3_endpoint, trio, tmp_path):
    svc = Service(redis_url, str(tmp_path), s3_endpoint=s3_endpoint,
                  GRAFT_ALLOWED_ROOTS=f"{tmp_path},{os.path.dirname(trio['source_base'])}", **SLOW)
    try:
        yield svc.start_api()
    finally:
        svc.stop()


def _wait_streaming(c, job_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = c.get(f"/v1/jobs/{job_id}").json()
        p = doc["progress"] or {}
        if doc["status"] == "running" and p.get("bytes_written", 0) > 0 and p.get("fraction", 1) < 0.5:
            return doc
        assert doc["status"] in ("queued", "validating", "running"), doc
        time.sleep(0.05)
    raise AssertionError(f"job never got mid-stream: {doc}")


def _objects(endpoint: str, bucket: str, prefix: str) -> tuple[list, list]:
    from worker.engine.storage.s3 import s3_client

    client = s3_client(endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return keys, uploads


def test_cancel_running_job_leaves_nothing(slow, trio, s3_endpoint, s3_bucket):
    slow.start_worker()
    out = f"s3://{s3_bucket}/cancelled/job"
    with slow.client() as c:
        job = c.post("/v1/jobs", json=job_body(trio, output=out)).json()
        _wait_streaming(c, job["id"])
        t0 = time.time()
        resp = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] in ("cancelling", "cancelled")
        done = wait_job(c, job["id"], timeout=10)
        assert done["status"] == "cancelled" and time.time() - t0 < 3, "a cancel stops between blocks"
        assert done["progress"]["fraction"] < 1 and done["result"] is None
        _problem = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert _problem.status_code == 409
        types = [e["type"] for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert "cancel_requested" in types and types[-1] == "finished"
    keys, uploads = _objects(s3_endpoint, s3_bucket, "cancelled/")
    assert keys == [] and uploads == [], "partial objects must be removed and uploads aborted"


def test_worker_killed_mid_job_is_retried_byte_identical(slow, trio, s3_endpoint, s3_bucket, tmp_path):
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in trio.items()}
    expected = local_graft(trio, str(tmp_path / "expected"), shard_size="50KB")
    out = f"s3://{s3_bucket}/out/killed"
    first = slow.start_worker()
    with slow.client() as c:
        job = c.post("/v1/jobs", json={**uris, "output": out, "options": {"shard_size": "50KB"}}).json()
        mid = _wait_streaming(c, job["id"])
        assert mid["attempt"] == 1
        slow.kill(first)  # the worker and its work horse, at once
        keys, _ = _objects(s3_endpoint, s3_bucket, "out/killed/")
        assert "out/killed/graft-manifest.json" not in keys
        t_killed = time.time()
        slow.start_worker(GRAFT_JOB_BLOCK_DELAY=0)  # only the kill had to land mid-stream: the retry runs at full speed
        done = wait_job(c, job["id"], timeout=60)
        recovered_in = time.time() - t_killed
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 2
        assert recovered_in < 30, f"recovery took {recovered_in:.1f}s"
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        types = [e["type"] for e in events]
        assert "worker_lost" in types and "retry" in types and types.count("started") == 2
    got = read_s3(s3_endpoint, out)
    assert ".graft-pending" not in got
    compare_dirs(expected, got)
    assert set(got) - {"graft-manifest.json", "README.md"} == set(os.listdir(expected)) - {
        "graft-manifest.json", "README.md"}, "no leftovers of the killed attempt"
    _, uploads = _objects(s3_endpoint, s3_bucket, "out/")
    assert uploads == []


def test_work_horse_killed_on_last_attempt_fails_the_job(redis_url, trio, tmp_path):
    """Only the work horse dies (OOM killer, segfault) while its worker lives, on the last attempt: RQ fails
    the job without our failure callback; the record must still end (failed, worker_lost), not stay running."""
    from service_fixtures import _descendants

    svc = Service(redis_url, str(tmp_path), GRAFT_ALLOWED_ROOTS=f"{tmp_path},{os.path.dirname(trio['source_base'])}",
                  GRAFT_MAX_ATTEMPTS=1, **SLOW)
    try:
        svc.start_api()
        worker = svc.start_worker()
        with svc.client() as c:
            job = c.post("/v1/jobs", json=job_body(trio)).json()
            _wait_streaming(c, job["id"])
            horses = _descendants(worker.pid)
            assert horses, "expected a work horse under the worker"
            for pid in horses:
                os.kill(pid, 9)
            done = wait_job(c, job["id"], timeout=20)
            assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
            assert worker.poll() is None, "the worker itself lives on"
    finally:
        svc.stop()
