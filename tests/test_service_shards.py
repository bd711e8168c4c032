"""One graft split by output shard across real RQ workers (worker/service/fanout.py): the split's bytes equal the
one-task graft's (plain, a recipe, with checks), a duplicated shard task and a SIGKILLed one change nothing, a
cancel during the fan-out publishes nothing, finalize runs only after every shard, and one tenant's split job
does not starve another tenant's one-task job."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime

import pytest
from checks_models import PROBE, PROMPTS, checks_family
from conftest import upload_dir
from service_fixtures import Service, compare_dirs, job_body, local_graft, read_local, read_s3, wait_job

SPLIT = {"GRAFT_SHARD_MIN_BYTES": 1, "GRAFT_LEASE_SECONDS": 2, "GRAFT_MONITOR_INTERVAL": 0.3}
SLOW = {"GRAFT_BLOCK_BYTES": 4096, "GRAFT_JOB_BLOCK_DELAY": 0.04}
SHARDS = {"shard_size": "50KB"}  # the trio's 216 KB output in 6 shards


@pytest.fixture
def service(redis_url, trio, tmp_path):
    made: list[Service] = []

    def start(**env) -> Service:
        roots = f"{tmp_path},{os.path.dirname(trio['source_base'])}"
        svc = Service(redis_url, str(tmp_path), GRAFT_ALLOWED_ROOTS=roots, **{**SPLIT, **env})
        made.append(svc)
        return svc.start_api()

    try:
        yield start
    finally:
        for svc in made:
            svc.stop()


def _events(c, job_id: str) -> list[dict]:
    return c.get(f"/v1/jobs/{job_id}/events").json()["data"]


def _wait_event(c, job_id: str, test, timeout: float = 30) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = _events(c, job_id)
        if test(events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"never happened: {events}")


def _started(events: list[dict]) -> list[str]:
    return [e["task"] for e in events if e["type"] == "task_started"]


def _finalize_after_every_shard(events: list[dict], shards: int) -> None:
    types = [(e["type"], e.get("task")) for e in events]
    final = types.index(("task_started", "final"))
    written = {t for kind, t in types[:final] if kind == "task_finished"}
    assert written == {f"s{i}" for i in range(shards)}, f"finalize started before every shard: {types}"
    assert types.count(("task_started", "final")) == 1


def test_split_writes_the_one_task_bytes(service, trio, tmp_path):
    svc = service()
    for _ in range(2):
        svc.start_worker()
    expected = local_graft(trio, str(tmp_path / "expected"), **SHARDS)
    out = tmp_path / "split"
    with svc.client() as c:
        job = c.post("/v1/jobs", json=job_body(trio, output=f"file://{out}", options=SHARDS)).json()
        done = wait_job(c, job["id"], timeout=60)
        events = _events(c, job["id"])
    assert done["status"] == "succeeded", done
    compare_dirs(expected, read_local(str(out)))
    assert sorted(os.listdir(out)) == sorted(os.listdir(expected))
    assert [n for n in os.listdir(tmp_path) if ".graft-tmp-" in n] == []
    split = next(e for e in events if e["type"] == "split")
    assert split["shards"] == 6 and split["parallelism"] == 6
    _finalize_after_every_shard(events, 6)
    assert [e["type"] for e in events].count("finished") == 1 and events[-1]["status"] == "succeeded"
    p = done["progress"]
    assert p["fraction"] == 1 and p["bytes_written"] == p["bytes_total"] == split["output_bytes"]
    with open(out / "graft-manifest.json") as fh, open(os.path.join(expected, "graft-manifest.json")) as gh:
        got, want = json.load(fh), json.load(gh)
    assert got["tensors"] == want["tensors"], "per-tensor statistics gathered by the tasks equal the one task's"
    assert got["stats"]["connectivity"] == want["stats"]["connectivity"]
    assert got["inputs"] == want["inputs"] and got["stats"]["split"]["shards"] == 6


def test_split_recipe_and_parallelism(service, trio, tmp_path):
    from worker.engine import GraftRequest, run_graft
    from worker.engine.planning.recipe import Recipe
    from worker.service.settings import Settings

    svc = service()
    for _ in range(2):
        svc.start_worker()
    pair = {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}"}
    body = {"target_base": f"file://{trio['target_base']}", "output": f"file://{tmp_path / 'ties'}",
            "diffs": [{**pair, "weight": 1.0}, {**pair, "weight": 0.4, "transform": {"method": "dare", "drop": 0.5,
                                                                                    "seed": 7}}],
            "merge": {"method": "ties", "density": 0.4}, "options": {**SHARDS, "parallelism": 2}}
    with svc.client() as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        done = wait_job(c, r.json()["id"], timeout=60)
        events = _events(c, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["recipe"]["options"]["parallelism"] == 2
    split = next(e for e in events if e["type"] == "split")
    assert split["parallelism"] == 2 and split["shards"] == 6
    running, most = set(), 0
    for e in events:  # never more than two shard tasks between their start and their end
        if e["type"] == "task_started" and e["task"] != "final":
            running.add(e["task"])
            most = max(most, len(running))
        elif e["type"] in ("task_finished", "task_cancelled"):
            running.discard(e["task"])
    assert most <= 2
    expected = str(tmp_path / "expected")
    run_graft(GraftRequest(Recipe.model_validate(done["recipe"]), expected), settings=Settings(cache_dir=""))
    compare_dirs(expected, read_local(str(tmp_path / "ties")))


def test_split_with_checks(redis_url, tmp_path):
    family = checks_family(str(tmp_path / "family"))
    svc = Service(redis_url, str(tmp_path), GRAFT_PROBE_MAX_TOKENS="512", **SPLIT)
    try:
        svc.start_api()
        svc.start_worker()
        models = {"source_base": f"file://{family['base']}", "source_finetuned": f"file://{family['finetuned']}",
                  "target_base": f"file://{family['near']}"}
        expected = local_graft({k: v.removeprefix("file://") for k, v in models.items()}, str(tmp_path / "expected"),
                               shard_size="4KB")
        shards = len([n for n in os.listdir(expected) if n.endswith(".safetensors")])
        assert shards >= 3
        out = tmp_path / "checked"
        body = {**models, "output": f"file://{out}", "options": {"shard_size": "4KB"}, "require": "compatible",
                "evaluate": {"probe_text": PROBE, "prompts": PROMPTS, "max_new_tokens": 2}}
        with svc.client() as c:
            done = wait_job(c, c.post("/v1/jobs", json=body).json()["id"], timeout=120)
            events = _events(c, done["id"])
    finally:
        svc.stop()
    assert done["status"] == "succeeded", done
    assert next(e for e in events if e["type"] == "split")["shards"] == shards
    compare_dirs(expected, read_local(str(out)))
    with open(out / "graft-manifest.json") as fh:
        manifest = json.load(fh)
    assert manifest["preflight"]["verdict"] == "compatible" == done["result"]["preflight"]["verdict"]
    assert manifest["evaluation"] == done["result"]["evaluation"] and manifest["evaluation"]["probe"]["tokens"] > 0


def test_duplicated_shard_task_changes_nothing(service, trio, tmp_path):
    from rq import Queue

    svc = service(**SLOW)
    svc.start_worker()
    expected = local_graft(trio, str(tmp_path / "expected"), **SHARDS)
    out = tmp_path / "dup"
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json=job_body(trio, output=f"file://{out}", options=SHARDS)).json()["id"]
        _wait_event(c, job_id, lambda ev: any(e["type"] == "split" for e in ev))
        # The same task again, ahead of everything: it writes shard 3 first; the original then finds it written.
        Queue(svc.queue, connection=svc.store().r).enqueue_call(
            "worker.service.fanout.run_task", args=(job_id, "s3"), job_id=f"{job_id}-s3-dup", at_front=True)
        done = wait_job(c, job_id, timeout=60)
        events = _events(c, job_id)
    assert done["status"] == "succeeded", done
    assert _started(events).count("s3") == 2
    assert sum(1 for e in events if e["type"] == "task_finished" and e["task"] == "s3") == 1
    assert any(e["type"] == "task_skipped" and e["task"] == "s3" for e in events)
    _finalize_after_every_shard(events, 6)
    compare_dirs(expected, read_local(str(out)))
    assert not [n for n in os.listdir(out) if ".part-" in n]


def test_killed_shard_task_is_retried_with_the_same_bytes(service, trio, s3_endpoint, s3_bucket, tmp_path):
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in trio.items()}
    expected = local_graft(trio, str(tmp_path / "expected"), **SHARDS)
    svc = service(**SLOW, GRAFT_S3_ENDPOINT_URL=s3_endpoint)
    first = svc.start_worker()
    out = f"s3://{s3_bucket}/out/split"
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json={**uris, "output": out, "options": SHARDS}).json()["id"]
        _wait_event(c, job_id, lambda ev: len(_started(ev)) >= 2)  # one shard written, the next one running
        time.sleep(0.3)
        svc.kill(first)
        killed_at = time.time()
        assert "graft-manifest.json" not in read_s3(s3_endpoint, out)
        svc.start_worker(GRAFT_JOB_BLOCK_DELAY=0)
        done = wait_job(c, job_id, timeout=90)
        events = _events(c, job_id)
    assert done["status"] == "succeeded", done
    lost = [e for e in events if e["type"] == "worker_lost"]
    assert len(lost) == 1 and lost[0]["task"].startswith("s"), [(e["type"], e.get("task")) for e in events]
    assert any(e["type"] == "task_retry" and e["task"] == lost[0]["task"] for e in events)
    assert _started(events).count(lost[0]["task"]) == 2, "only the killed shard is written again"
    # Seen dead within the lease once the new worker's monitor runs (its start-up is most of this on 2 busy
    # cores); the rest of the job's time is its other tasks.
    seen_in = datetime.fromisoformat(lost[0]["at"].replace("Z", "+00:00")).timestamp() - killed_at
    assert seen_in < 20, seen_in
    got = read_s3(s3_endpoint, out)
    assert ".graft-pending" not in got
    compare_dirs(expected, got)
    assert set(got) == set(os.listdir(expected))
    from worker.engine.storage.s3 import s3_client

    assert s3_client(s3_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_cancel_during_fan_out_publishes_nothing(service, trio, s3_endpoint, s3_bucket, tmp_path):
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in trio.items()}
    svc = service(**SLOW, GRAFT_S3_ENDPOINT_URL=s3_endpoint)
    for _ in range(2):
        svc.start_worker()
    out = f"s3://{s3_bucket}/out/cancelled"
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json={**uris, "output": out, "options": SHARDS}).json()["id"]
        _wait_event(c, job_id, lambda ev: any(e["type"] == "task_finished" for e in ev))
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        done = wait_job(c, job_id, timeout=20)
        events = _events(c, job_id)
        time.sleep(1)  # nothing is written after the job says cancelled
    assert done["status"] == "cancelled" and done["result"] is None
    assert ("task_started", "final") not in [(e["type"], e.get("task")) for e in events]
    assert [e["type"] for e in events].count("finished") == 1
    from worker.engine.storage.s3 import s3_client

    client = s3_client(s3_endpoint)
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", []) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_one_tenants_split_does_not_starve_another(service, trio, tmp_path):
    svc = service(**SLOW, GRAFT_SHARD_QUEUED_PER_TENANT=2)
    svc.start_worker()
    with svc.client("alpha") as a, svc.client("beta") as b:
        big = a.post("/v1/jobs", json=job_body(trio, output=f"file://{tmp_path / 'big'}", options=SHARDS)).json()
        _wait_event(a, big["id"], lambda ev: any(e["type"] == "split" for e in ev))
        small = b.post("/v1/jobs", json=job_body(trio, output=f"file://{tmp_path / 'small'}")).json()
        small_done = wait_job(b, small["id"], timeout=60)
        big_done = wait_job(a, big["id"], timeout=60)
        events = _events(a, big["id"])
    assert small_done["status"] == big_done["status"] == "succeeded"
    assert "split" not in [e["type"] for e in _events_of(svc, small["id"])], "one shard: one task"
    shard_starts = [e["at"] for e in events if e["type"] == "task_started" and e["task"] != "final"]
    # At most the tenant's cap of shard tasks were queued before it, plus the one running.
    before = [at for at in shard_starts if at < small_done["started_at"]]
    assert len(before) <= 3, (before, small_done["started_at"])
    assert small_done["finished_at"] < big_done["finished_at"]


def _events_of(svc: Service, job_id: str) -> list[dict]:
    return svc.store().events(job_id)
