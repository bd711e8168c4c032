"""Diffs through the real HTTP API and a real RQ worker: POST /v1/diffs extracts one (a job), GET and list show its
totals, a graft job naming it by id writes the three-model graft's bytes, another tenant can neither see nor use
it, an encoding parameter out of range is a 422 naming the field, and deleting it (local directory and S3 prefix)
removes its files, refuses new jobs naming it and fails a queued one with diff_deleted."""

from __future__ import annotations

import json
import os
import signal

import pytest
from service_fixtures import Service, job_body, read_local, read_s3, submit_and_wait, wait_job


@pytest.fixture(scope="module")
def svc(redis_url, s3_endpoint, trio, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("diffs"))
    service = Service(redis_url, root, s3_endpoint=s3_endpoint,
                      GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}")
    try:
        service.start_worker()  # first: its start (imports, registration) overlaps the API's
        service.start_api()
        yield service
    finally:
        service.stop()


def _pair(trio: dict) -> dict:
    return {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}"}


def _extract(c, trio: dict, **extra) -> dict:
    return submit_and_wait(c, "/v1/diffs", {**_pair(trio), **extra}, "diff_extract")


@pytest.fixture(scope="module")
def diff(svc, trio) -> dict:
    """One exact diff of the trio's pair, extracted by the service into alpha's namespace."""
    with svc.client() as c:
        return _extract(c, trio, shard_size=1 << 20, metadata={"team": "a"})


def test_an_extraction_is_a_diff_with_its_totals(svc, diff):
    artifact = diff["output"].removeprefix("file://")
    assert diff["output"] == f"file://{svc.root}/outputs/alpha/{diff['id']}"
    with open(os.path.join(artifact, "diff-manifest.json")) as fh:
        manifest = json.load(fh)
    assert diff["options"] == {"encoding": {"encoding": "exact"}, "shard_size": 1 << 20}
    assert diff["target_base"] is None and diff["result"]["diff"]["totals"] == manifest["totals"]
    with svc.client() as c:
        got = c.get(f"/v1/diffs/{diff['id']}").json()
        listed = c.get("/v1/diffs", params={"limit": 100}).json()
        assert c.get(f"/v1/diffs/{diff['id']}x").status_code == 404
    assert got["status"] == "succeeded" and got["object"] == "graft.diff" and got["job"] == f"/v1/jobs/{diff['id']}"
    assert got["totals"] == manifest["totals"] and got["totals"]["tensors"] > 0
    assert got["totals"]["rel_frobenius"] == 0.0 and got["totals"]["max_abs"] == 0.0  # exact
    assert got["encoding"] == manifest["encoding"] == {"encoding": "exact"}
    assert got["content_address"] == manifest["content_address"] and got["metadata"] == {"team": "a"}
    assert got["uri"] == diff["output"] and got["manifest_uri"] == f"{diff['output']}/diff-manifest.json"
    for role in ("source_base", "source_finetuned"):
        assert got["sources"][role]["uri"] == manifest["sources"][role]["uri"] == got[role]
    on_disk = read_local(artifact)
    assert {f["path"] for f in got["files"]} | {"diff-manifest.json"} == set(on_disk)
    assert {f["path"] for f in got["files"]} >= {s["path"] for s in manifest["shards"]}
    assert diff["id"] in [d["id"] for d in listed["data"]] and listed["object"] == "list"


def test_a_graft_naming_the_diff_writes_the_three_model_grafts_bytes(svc, diff, trio):
    with svc.client() as c:
        three = c.post("/v1/jobs", json=job_body(trio)).json()
        by_id = c.post("/v1/jobs", json={"diff": diff["id"], "target_base": f"file://{trio['target_base']}"})
        assert by_id.status_code == 202, by_id.text
        # a recipe's diffs take an id too, and a preflight the body's diff
        recipe = c.post("/v1/jobs", json={"target_base": f"file://{trio['target_base']}",
                                          "diffs": [{"diff": diff["id"], "weight": 1.0}]})
        preflight = c.post("/v1/preflights", json={"diff": diff["id"], "target_base": f"file://{trio['target_base']}",
                                                   "level": "headers"})
        assert recipe.status_code == 202 and preflight.status_code == 202, (recipe.text, preflight.text)
        done = {name: wait_job(c, resp["id"]) for name, resp in
                (("three", three), ("id", by_id.json()), ("recipe", recipe.json()), ("preflight", preflight.json()))}
    assert all(d["status"] == "succeeded" for d in done.values()), done
    job = done["id"]
    # the record shows the artifact the id stood for, never the engine's internal keys
    assert job["diff"] == diff["output"] and job["source_base"] is None and job["source_finetuned"] is None
    assert job["recipe"]["diffs"][0]["diff"] == diff["output"] and "source_base" not in job["recipe"]["diffs"][0]
    expected = read_local(done["three"]["result"]["uri"].removeprefix("file://"))
    shards = sorted(n for n in expected if n.endswith(".safetensors"))
    assert shards
    for name in ("id", "recipe"):
        got = read_local(done[name]["result"]["uri"].removeprefix("file://"))
        assert sorted(n for n in got if n.endswith(".safetensors")) == shards
        assert all(got[n] == expected[n] for n in shards), f"{name}: shards differ from the three-model graft's"
    assert done["preflight"]["result"]["report"]["verdict"] in ("compatible", "risky")


def test_another_tenant_can_neither_see_nor_use_a_diff(svc, diff, trio):
    target = f"file://{trio['target_base']}"
    with svc.client("beta") as c:
        assert c.get(f"/v1/diffs/{diff['id']}").status_code == 404
        assert c.delete(f"/v1/diffs/{diff['id']}").status_code == 404
        assert diff["id"] not in [d["id"] for d in c.get("/v1/diffs").json()["data"]]
        by_id = c.post("/v1/jobs", json={"diff": diff["id"], "target_base": target})
        in_recipe = c.post("/v1/jobs", json={"target_base": target, "diffs": [{"diff": diff["id"]}]})
        by_uri = c.post("/v1/jobs", json={"diff": diff["output"], "target_base": target})
    assert by_id.status_code == 422 and by_id.json()["errors"] == [
        {"field": "diff", "message": f"no diff {diff['id']}", "type": "diff_not_found"}]
    assert in_recipe.status_code == 422 and in_recipe.json()["errors"][0]["field"] == "diffs.0.diff"
    # its URI is under alpha's namespace: the URI policy refuses it, as it would a model there
    assert by_uri.status_code == 422 and by_uri.json()["errors"][0]["type"] == "uri_not_allowed"
    assert by_uri.json()["errors"][0]["field"] == "diff"
    with svc.client() as c:  # the owner still has it
        assert c.get(f"/v1/diffs/{diff['id']}").json()["status"] == "succeeded"


def test_an_encoding_parameter_out_of_range_is_a_422_naming_it(svc, trio):
    with svc.client() as c:
        resp = c.post("/v1/diffs", json={**_pair(trio), "encoding": {"encoding": "sparse", "density": 2}})
        unknown = c.post("/v1/diffs", json={**_pair(trio), "encoding": {"encoding": "sparse", "rank": 4}})
        both = c.post("/v1/diffs", json={**_pair(trio), "encoding": {"encoding": "lowrank", "rank": 8, "energy": 0.5}})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    assert [(e["field"], e["type"]) for e in resp.json()["errors"]] == [("encoding.sparse.density", "less_than_equal")]
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "encoding.sparse.rank"
    assert both.status_code == 422 and "rank or energy" in both.json()["detail"]


def _stopped(worker):
    """The worker (idle: no work horse) paused, so that what is queued stays queued until it resumes."""
    class Paused:
        def __enter__(self):
            os.kill(worker.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(worker.pid, signal.SIGCONT)

    return Paused()


def test_deleting_an_s3_diff_fails_the_queued_job_naming_it_and_refuses_new_ones(svc, trio, s3_endpoint, s3_bucket):
    out = f"s3://{s3_bucket}/diffs/one"
    target = f"file://{trio['target_base']}"
    with svc.client() as c:
        diff = _extract(c, trio, output=out, encoding={"encoding": "bf16"})
        assert sorted(read_s3(s3_endpoint, out)) == sorted(
            ["diff-manifest.json", *(f["path"] for f in diff["result"]["files"])])
        with _stopped(svc.workers[0]):
            queued = c.post("/v1/jobs", json={"diff": diff["id"], "target_base": target}).json()
            deleted = c.delete(f"/v1/diffs/{diff['id']}")
            assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["status"] == "deleted" and deleted.json()["deleted_at"]
        failed = wait_job(c, queued["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "diff_deleted", failed
        assert failed["result"] is None and failed["progress"] is None  # refused before anything was read
        assert read_s3(s3_endpoint, out) == {}  # the whole prefix: manifest, shards, side files
        for body, field in (({"diff": diff["id"]}, "diff"), ({"diff": out}, "diff"),
                            ({"diffs": [{"diff": diff["id"]}]}, "diffs.0.diff")):
            refused = c.post("/v1/jobs", json={**body, "target_base": target})
            assert refused.status_code == 422 and refused.json()["errors"][0]["type"] == "diff_deleted", refused.text
            assert refused.json()["errors"][0]["field"] == field
        assert diff["id"] not in [d["id"] for d in c.get("/v1/diffs").json()["data"]]
        assert c.get(f"/v1/diffs/{diff['id']}").json()["status"] == "deleted"
        assert c.delete(f"/v1/diffs/{diff['id']}").json()["status"] == "deleted"  # again: nothing left to do
        # the location takes a new extraction, which is a diff again (by URI too)
        again = _extract(c, trio, output=out)
        by_uri = c.post("/v1/jobs", json={"diff": out, "target_base": target})
        assert by_uri.status_code == 202, by_uri.text
        assert wait_job(c, by_uri.json()["id"])["status"] == "succeeded"
        assert again["id"] in [d["id"] for d in c.get("/v1/diffs").json()["data"]]


def test_deleting_a_local_diff_removes_its_directory(svc, trio):
    with svc.client() as c:
        diff = _extract(c, trio, encoding={"encoding": "sparse", "density": 0.5})
        assert c.get(f"/v1/diffs/{diff['id']}").json()["totals"]["stored"].get("sparse", 0) > 0
        with _stopped(svc.workers[0]):
            queued = c.post("/v1/diffs", json=_pair(trio)).json()
            unfinished = c.delete(f"/v1/diffs/{queued['id']}")
            cancelled = c.post(f"/v1/jobs/{queued['id']}/cancel").json()
        deleted = c.delete(f"/v1/diffs/{diff['id']}")
    # an extraction not finished is no diff to delete yet (cancel it instead); a cancelled one never will be
    assert unfinished.status_code == 409 and unfinished.json()["code"] == "diff_unfinished"
    assert "cancel its extraction" in unfinished.json()["detail"] and cancelled["status"] == "cancelled"
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert not os.path.exists(diff["output"].removeprefix("file://"))
