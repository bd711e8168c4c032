"""One graft split by output shard across real RQ workers (worker/service/fanout.py): the split's bytes equal the
one-task graft's (plain, a recipe, with checks), a duplicated shard task and a SIGKILLed one change nothing, a
cancel during the fan-out publishes nothing, finalize runs only after every shard, and one tenant's split job
does not starve another tenant's one-task job."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime

import pytest
from checks_models import PROBE, PROMPTS, checks_family
from conftest import upload_dir
from service_fixtures import (
    Service,
    compare_dirs,
    job_body,
    local_graft,
    read_local,
    wait_job,
)

# Every task slowed a little (4 KB blocks, 30 ms each: about 1.6 s per job of the trio) so that a kill, a cancel
# and a second tenant's job land mid fan-out; one API and two workers for the module (their start-up is most of
# a service test's time on a busy machine). Progress written at every block: a shard streams for about 0.4 s,
# under the default interval, so a task's record said "streaming, 0%" until it ended, and the kill test, which
# picks a task mid-stream by it, sometimes killed a worker whose task had finished.
SPLIT = {"GRAFT_SHARD_MIN_BYTES": 1, "GRAFT_LEASE_SECONDS": 2, "GRAFT_MONITOR_INTERVAL": 0.3,
         "GRAFT_BLOCK_BYTES": 4096, "GRAFT_JOB_BLOCK_DELAY": 0.03, "GRAFT_SHARD_QUEUED_PER_TENANT": 2,
         "GRAFT_PROBE_MAX_TOKENS": 512, "GRAFT_PROGRESS_INTERVAL": 0}
SHARDS = {"shard_size": "50KB"}  # the trio's 216 KB output in 6 shards


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("split-checks-models")))


@pytest.fixture(scope="module")
def svc(redis_url, trio, family, s3_endpoint, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("split"))
    roots = f"{root},{os.path.dirname(trio['source_base'])},{os.path.dirname(family['base'])}"
    service = Service(redis_url, root, s3_endpoint=s3_endpoint, GRAFT_ALLOWED_ROOTS=roots, **SPLIT)
    try:
        service.start_api()
        for _ in range(2):
            service.start_worker()
        yield service
    finally:
        service.stop()


@pytest.fixture
def out_dir(svc):
    path = os.path.join(svc.root, uuid.uuid4().hex[:8])
    os.makedirs(path)
    return path


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


def one_task(paths: dict[str, str], output: str, **options) -> str:
    """The graft as one task, in this process, with the workers' block size: the per-tensor statistics are
    float sums over blocks, so they are compared at the same block size."""
    from worker.engine import GraftOptions, GraftRequest, run_graft
    from worker.service.settings import Settings

    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], output,
                                  GraftOptions(**options))
    run_graft(request, settings=Settings(cache_dir="", block_bytes=SPLIT["GRAFT_BLOCK_BYTES"]))
    return output


def _manifest(directory: str) -> dict:
    with open(os.path.join(directory, "graft-manifest.json")) as fh:
        return json.load(fh)


def _started(events: list[dict]) -> list[str]:
    return [e["task"] for e in events if e["type"] == "task_started"]


def _finalize_after_every_shard(events: list[dict], shards: int) -> None:
    types = [(e["type"], e.get("task")) for e in events]
    final = types.index(("task_started", "final"))
    written = {t for kind, t in types[:final] if kind == "task_finished"}
    assert written == {f"s{i}" for i in range(shards)}, f"finalize started before every shard: {types}"
    assert types.count(("task_started", "final")) == 1


def test_split_writes_the_one_task_bytes(svc, trio, out_dir, tmp_path):
    expected = one_task(trio, str(tmp_path / "expected"), **SHARDS)
    out = os.path.join(out_dir, "split")
    with svc.client() as c:
        job = c.post("/v1/jobs", json=job_body(trio, output=f"file://{out}", options=SHARDS)).json()
        done = wait_job(c, job["id"], timeout=60)
        events = _events(c, job["id"])
    assert done["status"] == "succeeded", done
    compare_dirs(expected, read_local(out))
    assert sorted(os.listdir(out)) == sorted(os.listdir(expected))
    assert os.listdir(out_dir) == ["split"], "no staging left beside it"
    split = next(e for e in events if e["type"] == "split")
    assert split["shards"] == 6 and split["parallelism"] == 6
    _finalize_after_every_shard(events, 6)
    assert [e["type"] for e in events].count("finished") == 1 and events[-1]["status"] == "succeeded"
    p = done["progress"]
    assert p["fraction"] == 1 and p["bytes_written"] == p["bytes_total"] == split["output_bytes"]
    got, want = _manifest(out), _manifest(expected)
    assert got["tensors"] == want["tensors"], "per-tensor statistics gathered by the tasks equal the one task's"
    assert got["stats"]["connectivity"] == want["stats"]["connectivity"]
    assert got["inputs"] == want["inputs"] and got["stats"]["split"]["shards"] == 6
    assert done["result"]["files"] == got["output"]["files"]


def test_split_recipe_and_parallelism(svc, trio, out_dir, tmp_path):
    from worker.engine import GraftRequest, run_graft
    from worker.engine.planning.recipe import Recipe
    from worker.service.settings import Settings

    pair = {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}"}
    out = os.path.join(out_dir, "ties")
    body = {"target_base": f"file://{trio['target_base']}", "output": f"file://{out}",
            "diffs": [{**pair, "weight": 1.0}, {**pair, "weight": 0.4, "transform": {"method": "dare", "drop": 0.5,
                                                                                    "seed": 7}}],
            "merge": {"method": "ties", "density": 0.4}, "options": {**SHARDS, "parallelism": 1}}
    with svc.client() as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        done = wait_job(c, r.json()["id"], timeout=60)
        events = _events(c, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["recipe"]["options"]["parallelism"] == 1
    split = next(e for e in events if e["type"] == "split")
    assert split["parallelism"] == 1 and split["shards"] == 6
    running, most = set(), 0
    for e in events:  # two workers, but one shard task at a time
        if e["type"] == "task_started" and e["task"] != "final":
            running.add(e["task"])
            most = max(most, len(running))
        elif e["type"] in ("task_finished", "task_cancelled", "task_skipped"):
            running.discard(e["task"])
    assert most == 1
    expected = str(tmp_path / "expected")
    run_graft(GraftRequest(Recipe.model_validate(done["recipe"]), expected),
              settings=Settings(cache_dir="", block_bytes=SPLIT["GRAFT_BLOCK_BYTES"]))
    compare_dirs(expected, read_local(out))
    assert _manifest(out)["tensors"] == _manifest(expected)["tensors"], "the merge's reports (kept, sign agreement)"


def test_split_with_checks(svc, family, out_dir, tmp_path):
    models = {"source_base": f"file://{family['base']}", "source_finetuned": f"file://{family['finetuned']}",
              "target_base": f"file://{family['near']}"}
    expected = local_graft({k: v.removeprefix("file://") for k, v in models.items()}, str(tmp_path / "expected"),
                           shard_size="80KB")
    shards = len([n for n in os.listdir(expected) if n.endswith(".safetensors")])
    assert shards >= 3
    out = os.path.join(out_dir, "checked")
    body = {**models, "output": f"file://{out}", "options": {"shard_size": "80KB"}, "require": "compatible",
            "evaluate": {"probe_text": PROBE, "prompts": PROMPTS, "max_new_tokens": 2}}
    with svc.client() as c:
        done = wait_job(c, c.post("/v1/jobs", json=body).json()["id"], timeout=120)
        events = _events(c, done["id"])
    assert done["status"] == "succeeded", done
    assert next(e for e in events if e["type"] == "split")["shards"] == shards
    compare_dirs(expected, read_local(out))
    with open(os.path.join(out, "graft-manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["preflight"]["verdict"] == "compatible" == done["result"]["preflight"]["verdict"]
    assert manifest["evaluation"] == done["result"]["evaluation"] and manifest["evaluation"]["probe"]["tokens"] > 0


def test_duplicated_shard_task_changes_nothing(svc, trio, out_dir, tmp_path):
    from rq import Queue

    expected = local_graft(trio, str(tmp_path / "expected"), **SHARDS)
    out = os.path.join(out_dir, "dup")
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json=job_body(trio, output=f"file://{out}", options=SHARDS)).json()["id"]
        _wait_event(c, job_id, lambda ev: any(e["type"] == "split" for e in ev))
        # The same task again, ahead of everything: it writes shard 5 before the original (which then finds it
        # written) or beside it (both write the same bytes).
        Queue(svc.queue, connection=svc.store().r).enqueue_call(
            "worker.service.fanout.run_task", args=(job_id, "s5"), job_id=f"{job_id}-s5-dup", at_front=True)
        done = wait_job(c, job_id, timeout=60)
        events = _events(c, job_id)
    assert done["status"] == "succeeded", done
    assert _started(events).count("s5") == 2
    ends = [e["type"] for e in events if e.get("task") == "s5" and e["type"] in ("task_finished", "task_skipped")]
    assert "task_finished" in ends and len(ends) == 2, ends
    _finalize_after_every_shard(events, 6)
    compare_dirs(expected, read_local(out))
    assert not [n for n in os.listdir(out) if ".part-" in n]


def _worker_on_a_shard(svc: Service, job_id: str, timeout: float = 20):
    """The worker process whose work horse runs one of the job's shard tasks now (RQ's worker records say
    which), to kill mid-shard."""
    from rq import Worker

    from worker.service.task_records import TaskRecords

    r = svc.store().r
    progress_key = TaskRecords(r, svc.prefix).key(job_id, "tasks:progress")
    deadline = time.time() + timeout
    while time.time() < deadline:
        for w in Worker.all(connection=r):
            current = w.get_current_job_id() or ""
            raw = r.hget(progress_key, current.removeprefix(f"{job_id}-"))
            doc = json.loads(raw) if raw else {}
            if current.startswith(f"{job_id}-s") and doc.get("phase") == "streaming" and doc["fraction"] < 0.5:
                proc = next((p for p in svc.workers if p.pid == w.pid and p.poll() is None), None)
                if proc is not None:
                    return proc, current.removeprefix(f"{job_id}-")
        time.sleep(0.02)
    raise AssertionError("no shard task was caught mid-stream")


def test_killed_shard_task_is_retried_with_the_same_bytes(svc, trio, out_dir, tmp_path):
    expected = one_task(trio, str(tmp_path / "expected"), **SHARDS)
    out = os.path.join(out_dir, "killed")
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json=job_body(trio, output=f"file://{out}", options=SHARDS)).json()["id"]
        _wait_event(c, job_id, lambda ev: any(e["type"] == "task_finished" for e in ev))  # mid fan-out
        victim, task = _worker_on_a_shard(svc, job_id)
        svc.kill(victim)  # the worker and its work horse: SIGKILL, mid-shard
        killed_at = time.time()
        svc.workers.remove(victim)
        svc.start_worker()  # the module's other tests want two
        assert not os.path.exists(out)
        done = wait_job(c, job_id, timeout=60)
        events = _events(c, job_id)
    assert done["status"] == "succeeded", done
    lost = [e for e in events if e["type"] == "worker_lost"]
    assert [e["task"] for e in lost] == [task], [(e["type"], e.get("task")) for e in events]
    assert any(e["type"] == "task_retry" and e["task"] == task for e in events)
    assert _started(events).count(task) == 2, "only the killed shard is written again"
    seen_in = datetime.fromisoformat(lost[0]["at"].replace("Z", "+00:00")).timestamp() - killed_at
    assert seen_in < 3 * 2 + 1, f"the other worker's monitor saw the lease lapse after {seen_in:.1f}s"
    compare_dirs(expected, read_local(out))
    assert _manifest(out)["tensors"] == _manifest(expected)["tensors"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(expected)) and os.listdir(out_dir) == ["killed"], (
        "no part files of the killed task, no staging left")


def test_cancel_during_fan_out_publishes_nothing(svc, trio, s3_endpoint, s3_bucket):
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in trio.items()}
    out = f"s3://{s3_bucket}/out/cancelled"
    with svc.client() as c:
        job_id = c.post("/v1/jobs", json={**uris, "output": out, "options": SHARDS}).json()["id"]
        _wait_event(c, job_id, lambda ev: any(e["type"] == "task_finished" for e in ev))
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        done = wait_job(c, job_id, timeout=20)
        time.sleep(1)  # nothing is written after the job says cancelled
        events = _events(c, job_id)
    assert done["status"] == "cancelled" and done["result"] is None
    assert ("task_started", "final") not in [(e["type"], e.get("task")) for e in events]
    assert [e["type"] for e in events].count("finished") == 1
    assert "output_discarded" in [e["type"] for e in events]
    from worker.engine.storage.s3 import s3_client

    client = s3_client(s3_endpoint)
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", []) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_one_tenants_split_does_not_starve_another(svc, trio, out_dir):
    with svc.client("alpha") as a, svc.client("beta") as b:
        big = a.post("/v1/jobs", json=job_body(trio, output=f"file://{out_dir}/big",
                                               options={"shard_size": "16KB"})).json()
        split = _wait_event(a, big["id"], lambda ev: any(e["type"] == "split" for e in ev))
        shards = next(e for e in split if e["type"] == "split")["shards"]
        small = b.post("/v1/jobs", json=job_body(trio, output=f"file://{out_dir}/small")).json()
        small_done = wait_job(b, small["id"], timeout=60)
        big_done = wait_job(a, big["id"], timeout=60)
        events = _events(a, big["id"])
    assert small_done["status"] == big_done["status"] == "succeeded"
    assert "split" not in [e["type"] for e in svc.store().events(small["id"])], "one shard: one task"
    starts = [e["at"] for e in events if e["type"] == "task_started" and e["task"] != "final"]
    # Queued behind at most the tenant's cap (2) of the big job's tasks, and as many more as a refill racing the
    # submission slips in before it reaches the queue; the rest wait in the big job's record.
    overtaking = [at for at in starts if small_done["created_at"] < at < small_done["started_at"]]
    assert shards >= 10 and len(overtaking) <= 4, (shards, overtaking, small_done["started_at"])
    assert small_done["finished_at"] < big_done["finished_at"]
