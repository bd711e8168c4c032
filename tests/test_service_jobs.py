"""Jobs through the real HTTP API with a real RQ worker: file:// and s3:// models, byte for byte against a
local run_graft; progress, events, metrics, webhooks with signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import upload_dir
from service_fixtures import (
    WEBHOOK_SECRET,
    Service,
    compare_dirs,
    job_body,
    local_graft,
    read_local,
    read_s3,
    wait_job,
)


@pytest.fixture(scope="module")
def svc(redis_url, s3_endpoint, trio, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("svc"))
    models_root = os.path.dirname(trio["source_base"])
    service = Service(redis_url, root, s3_endpoint=s3_endpoint,
                      GRAFT_ALLOWED_ROOTS=f"{root},{models_root}")
    try:
        service.start_api()
        service.start_worker()
        yield service
    finally:
        service.stop()


def test_file_job_matches_local_run(svc, trio, tmp_path):
    expected = local_graft(trio, str(tmp_path / "expected"), alpha=0.75, shard_size="40KB")
    with svc.client() as c:
        resp = c.post("/v1/jobs", json=job_body(trio, options={"alpha": 0.75, "shard_size": "40KB"},
                                                 metadata={"team": "a"}))
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
        assert int(resp.headers["retry-after"]) >= 1
        assert job["status"] == "queued" and job["object"] == "graft.job" and job["attempt"] == 0
        assert job["output"] == f"file://{svc.root}/outputs/alpha/{job['id']}"
        done = wait_job(c, job["id"])
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1 and done["metadata"] == {"team": "a"}
        assert done["started_at"] and done["finished_at"] and done["error"] is None
        assert done["progress"]["fraction"] == 1.0 and done["progress"]["tensors_done"] == done["progress"][
            "tensors_total"]
        got = read_local(done["result"]["uri"].removeprefix("file://"))
        compare_dirs(expected, got)
        for f in done["result"]["files"]:
            assert hashlib.sha256(got[f["path"]]).hexdigest() == f["sha256"] and len(got[f["path"]]) == f["size"]
        assert done["result"]["manifest_uri"].endswith("graft-manifest.json")
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        types = [e["type"] for e in events]
        assert types[0] == "queued" and "started" in types and types[-1] == "finished"
        assert {e.get("phase") for e in events if e["type"] == "phase"} >= {"resolving", "streaming", "committing"}
        # every warning the engine reported (the manifest keeps them all) is an event too
        manifest = json.loads(got["graft-manifest.json"])
        assert len([e for e in events if e["type"] == "warning"]) == len(manifest["warnings"])
        assert all(e["at"].endswith("Z") for e in events)


def test_s3_job_matches_local_run(svc, trio, s3_endpoint, s3_bucket, tmp_path):
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"models/{role}") for role, path in trio.items()}
    expected = local_graft(trio, str(tmp_path / "expected"), shard_size="30KB", dtype="float32")
    out = f"s3://{s3_bucket}/grafted/run1"
    with svc.client() as c:
        resp = c.post("/v1/jobs", json={**uris, "output": out, "options": {"shard_size": "30KB", "dtype": "float32"}})
        assert resp.status_code == 202, resp.text
        done = wait_job(c, resp.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["uri"] == out
    got = read_s3(s3_endpoint, out)
    assert "graft-manifest.json" in got and ".graft-pending" not in got
    compare_dirs(expected, got)
    manifest = json.loads(got["graft-manifest.json"])
    assert manifest["output"]["files"] == done["result"]["files"]
    for f in done["result"]["files"]:  # sha256 computed while streaming equals the stored object's
        assert hashlib.sha256(got[f["path"]]).hexdigest() == f["sha256"]


def test_progress_visible_while_running(redis_url, trio, tmp_path):
    """With blocks slowed down, GET shows the job running with partial progress, written ~every 0.5 s."""
    svc = Service(redis_url, str(tmp_path), GRAFT_ALLOWED_ROOTS=f"{tmp_path},{os.path.dirname(trio['source_base'])}",
                  GRAFT_BLOCK_BYTES=4096, GRAFT_JOB_BLOCK_DELAY=0.05)
    try:
        svc.start_api()
        svc.start_worker()
        with svc.client() as c:
            job = c.post("/v1/jobs", json=job_body(trio)).json()
            seen: list[dict] = []
            deadline = time.time() + 60
            while time.time() < deadline:
                doc = c.get(f"/v1/jobs/{job['id']}").json()
                if doc["status"] == "running" and doc["progress"] and 0 < doc["progress"]["fraction"] < 1:
                    seen.append(doc["progress"])
                if doc["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.1)
            assert doc["status"] == "succeeded", doc
        fractions = [p["fraction"] for p in seen]
        assert len(set(fractions)) >= 2, "progress should move while the job runs"
        assert fractions == sorted(fractions)
        assert any(p["eta_seconds"] is not None and p["eta_seconds"] > 0 for p in seen)
        # ~0.5 s between writes: far fewer distinct values than polls (polled every 0.1 s)
        assert len(set(fractions)) <= len(fractions) // 2 + 1
    finally:
        svc.stop()


class _Receiver(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((dict(self.headers), body))
        code = 500 if len(type(self).calls) <= type(self).fail_first else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_signed_and_retried(svc, trio):
    _Receiver.calls, _Receiver.fail_first = [], 1
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        with svc.client() as c:
            job = c.post("/v1/jobs", json=job_body(trio, webhook_url=url)).json()
            assert wait_job(c, job["id"])["status"] == "succeeded"
            deadline = time.time() + 20
            while len(_Receiver.calls) < 2 and time.time() < deadline:
                time.sleep(0.1)
            assert len(_Receiver.calls) == 2, "first delivery got a 500: it must be retried once"
            headers, body = _Receiver.calls[-1]
            sig = headers["Graft-Signature"]
            ts = sig.split(",")[0].removeprefix("t=")
            mac = sig.split(",")[1].removeprefix("v1=")
            expected = hmac.new(WEBHOOK_SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(mac, expected)
            assert not hmac.compare_digest(
                mac, hmac.new(b"wrong", f"{ts}.".encode() + body, hashlib.sha256).hexdigest())
            payload = json.loads(body)
            assert payload["type"] == "graft.job.succeeded" and payload["data"]["id"] == job["id"]
            types = [e["type"] for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
            assert "webhook_failed" in types and "webhook_delivered" in types
    finally:
        server.shutdown()


def test_metrics_after_jobs(svc, trio):
    with svc.client() as c:
        job = c.post("/v1/jobs", json=job_body(trio)).json()
        wait_job(c, job["id"])
        c.get(f"/v1/jobs/{job['id']}")
        text = c.get("/metrics").text
    assert 'graft_jobs{status="succeeded"}' in text
    assert 'graft_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}' in text
    assert "graft_http_request_duration_seconds_bucket" in text
    assert "graft_queue_depth" in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["graft_bytes_written_total"] > 0 and values["graft_tensors_total"] > 0
    assert values["graft_job_duration_seconds_count"] >= 1
    assert values['graft_jobs{status="succeeded"}'] >= 1


def test_webhook_claimed_by_one_sender_only(redis_url):
    """Two workers' senders both saw a due delivery: only the first claim wins (the second one's clock is later,
    so a ZADD GT would let it win too and the webhook would be POSTed twice)."""
    import uuid

    import redis as redis_lib

    from worker.service.settings import Settings
    from worker.service.webhooks import WebhookSender

    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:10]}:")
    conn = redis_lib.Redis.from_url(redis_url)
    a, b = WebhookSender(conn, settings), WebhookSender(conn, settings)
    key = a.store.webhooks_key
    try:
        member = json.dumps({"job": "job_x", "n": 0, "status": "succeeded"}).encode()
        conn.zadd(key, {member: time.time() - 1})
        now = time.time()
        assert conn.zrangebyscore(key, "-inf", now) == [member]  # both senders see it due
        assert a.claim(member, now)
        time.sleep(0.01)
        assert not b.claim(member, now)
        assert conn.zscore(key, member) > now + settings.webhook_timeout
        assert not a.claim(b"missing", now)
    finally:
        conn.delete(key)
        a.pool.shutdown()
        b.pool.shutdown()


def test_webhook_connects_to_the_address_it_checked(redis_url, monkeypatch):
    """DNS rebinding: the name resolves to a public address when checked and to 127.0.0.1 right after. The POST
    must go to the checked address (pinned), never to a second, unchecked resolution."""
    import socket
    import uuid

    import redis as redis_lib

    from worker.service.job_store import JobStore
    from worker.service.settings import Settings
    from worker.service.webhooks import WebhookSender

    _Receiver.calls, _Receiver.fail_first = [], 0
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real = socket.getaddrinfo
    answers = []

    def rebinding(host, port, *args, **kwargs):
        if host != "hook.example":
            return real(host, port, *args, **kwargs)
        addr = "8.8.8.8" if not answers else "127.0.0.1"
        answers.append(addr)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:10]}:", webhook_allow_private=False, webhook_timeout=1)
    conn = redis_lib.Redis.from_url(redis_url)
    store = JobStore(conn, settings.key_prefix)
    sender = WebhookSender(conn, settings)
    job_id = "job_rebind"
    try:
        store.create({"id": job_id, "status": "succeeded", "created_at": "x",
                      "webhook_url": f"http://hook.example:{server.server_port}/hook"}, "alpha")
        member = json.dumps({"job": job_id, "n": 0, "status": "succeeded"}).encode()
        conn.zadd(store.webhooks_key, {member: time.time()})
        sender._deliver(member)
        assert _Receiver.calls == [], "the POST reached 127.0.0.1 through a second DNS answer"
        assert answers == ["8.8.8.8"], answers
        failed = [e for e in store.events(job_id) if e["type"] == "webhook_failed"]
        assert failed and failed[0]["will_retry"]
    finally:
        server.shutdown()
        sender.pool.shutdown()
        keys = [store.job_key(job_id), store.events_key(job_id), store.tenant_key("alpha"), store.webhooks_key,
                store.status_key("succeeded")]
        conn.delete(*keys)


def test_an_attempt_taken_for_dead_stops_when_a_newer_one_starts(redis_url, trio, s3_endpoint, s3_bucket):
    """The fence: an attempt whose lease lapsed while it lived sees the newer attempt's number at its next
    check and stops, leaving the output (objects with the same names as the newer attempt's) untouched."""
    import uuid

    import redis as redis_lib

    from worker.engine import GraftOptions, GraftRequest, GraftSuperseded, run_graft
    from worker.engine.storage.s3 import s3_client
    from worker.service.job_store import JobStore
    from worker.service.jobs import _Reporter
    from worker.service.settings import Settings

    settings = Settings(key_prefix=f"test-{uuid.uuid4().hex[:10]}:", block_bytes=16 << 10)
    conn = redis_lib.Redis.from_url(redis_url)
    store = JobStore(conn, settings.key_prefix)
    job_id = "job_fence"
    try:
        store.update(job_id, attempt=1)
        reporter = _Reporter(store, job_id, settings, attempt=1)
        assert reporter.should_cancel() is False
        blocks = []

        def should_cancel() -> bool:
            blocks.append(1)
            if len(blocks) == 5:  # mid-stream, the monitor's retry starts attempt 2
                store.update(job_id, attempt=2)
                reporter._cancel_checked = 0.0
            return reporter.should_cancel()

        request = GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"],
                               f"s3://{s3_bucket}/fenced", GraftOptions(shard_size="100KB"))
        with pytest.raises(GraftSuperseded):
            run_graft(request, settings=settings, should_cancel=should_cancel)
        keys = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket,
                                                                          Prefix="fenced/").get("Contents", [])}
        assert "fenced/.graft-pending" in keys  # left for the newer attempt, which owns the prefix now
        assert "fenced/graft-manifest.json" not in keys
        assert store.get(job_id)["attempt"] == 2
    finally:
        for key in conn.scan_iter(match=f"{settings.key_prefix}*"):
            conn.delete(key)


def test_recipe_job_matches_local_run(svc, trio, tmp_path):
    """A recipe through the API (diffs in place of the three fields, a merge, rules): the job records it, the
    statistics phase shows in the events, and the output equals the engine's own run of the same recipe."""
    from worker.engine import GraftRequest, run_graft
    from worker.engine.planning.recipe import load_recipe
    from worker.service.settings import Settings

    diffs = [{"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}",
              "weight": [0.5, 1.0]},
             {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['target_base']}",
              "weight": 0.5, "transform": {"method": "dare", "drop": 0.5, "seed": 3}}]
    body = {"target_base": f"file://{trio['target_base']}", "diffs": diffs, "merge": {"method": "ties", "density": 0.3},
            "rules": [{"match": "embed_tokens|lm_head", "weight": 0.0}],
            "options": {"vocab": "target", "shard_size": "40KB"}}
    recipe = load_recipe({k: v for k, v in body.items()})
    expected = str(tmp_path / "expected")
    run_graft(GraftRequest(recipe, expected), settings=Settings(cache_dir=""))
    with svc.client() as c:
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["recipe"]["merge"]["method"] == "ties"
        done = wait_job(c, resp.json()["id"])
        assert done["status"] == "succeeded", done
        phases = [e.get("phase") for e in c.get(f"/v1/jobs/{done['id']}/events").json()["data"] if e["type"] == "phase"]
        assert phases.index("statistics") < phases.index("streaming")
        both = c.post("/v1/jobs", json={**body, "source_base": diffs[0]["source_base"]})
        assert both.status_code == 422 and both.json()["errors"][0]["field"] == "source_base"
    got = read_local(done["output"].removeprefix("file://"))
    compare_dirs(expected, got)
    assert json.loads(got["graft-manifest.json"])["recipe"]["merge"]["method"] == "ties"


def test_mergekit_config_job_matches_the_cli(svc, trio, tmp_path):
    """The same mergekit YAML through the API and through `graft run --mergekit-config` writes the same bytes;
    its model references go through the tenant's URI policy like any other."""
    import subprocess
    import sys

    config = f"""merge_method: ties
base_model: file://{trio['source_base']}
models:
  - model: file://{trio['source_finetuned']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: file://{trio['target_base']}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
out_dtype: bfloat16
"""
    path = tmp_path / "ties.yml"
    path.write_text(config)
    expected = tmp_path / "expected"
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--mergekit-config", str(path), "--output",
                           str(expected), "--shard-size", "40KB"], capture_output=True, text=True,
                          env={**os.environ, "GRAFT_CACHE_DIR": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    with svc.client() as c:
        resp = c.post("/v1/jobs", json={"mergekit_config": config, "options": {"shard_size": "40KB"}})
        assert resp.status_code == 202, resp.text
        assert resp.json()["recipe"]["merge"]["method"] == "ties"
        job = wait_job(c, resp.json()["id"])
        assert job["status"] == "succeeded", job
        refused = c.post("/v1/jobs", json={"mergekit_config": config.replace(f"file://{trio['target_base']}",
                                                                            "file:///etc")})
        assert refused.status_code == 422 and refused.json()["errors"][0]["type"] == "uri_not_allowed"
        both = c.post("/v1/jobs", json={"mergekit_config": config, "target_base": f"file://{trio['target_base']}"})
        assert both.status_code == 422 and both.json()["errors"][0]["field"] == "target_base"
    compare_dirs(str(expected), read_local(job["output"].removeprefix("file://")))
