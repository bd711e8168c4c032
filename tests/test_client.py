"""The service's client, `graft jobs ...`, against the running service (a real API and RQ worker: service_fixtures),
run in this process as `graft` runs it: a graft submitted and followed with its progress bar, a failing one
exiting as `graft run` exits, a cancel, the server's refusals printed, and no torch in the client's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml
from service_fixtures import KEYS, Service

from worker.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def service(redis_url, trio, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("client"))
    # Small blocks, each held a moment: a graft takes about a second, so the bar moves and a cancel lands first.
    svc = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                  GRAFT_BLOCK_BYTES=16384, GRAFT_JOB_BLOCK_DELAY=0.02, GRAFT_PROGRESS_INTERVAL=0.1)
    try:
        svc.start_worker()  # first: its start (imports, registration) overlaps the API's
        svc.start_api()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def graft(service, monkeypatch, capsys):
    """`graft ARGS...` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("GRAFT_SERVER", service.url)
    monkeypatch.setenv("GRAFT_API_KEY", KEYS["alpha"])

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def _models(trio: dict, **roles: str) -> list[str]:
    uris = {role: f"file://{path}" for role, path in trio.items()} | roles
    return [f"--{role.replace('_', '-')}={uri}" for role, uri in uris.items()]


def test_submit_wait_with_progress_then_get_list_events(graft, trio):
    status, out, err = graft("jobs", "submit", *_models(trio), "--alpha", "0.75", "--shard-size", "40KB",
                             "--wait", "--progress", "--interval", "0.05", "--json")
    assert status == 0, err
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["kind"] == "graft" and job["options"]["alpha"] == 0.75
    assert job["options"]["shard_size"] == 40_000 and job["result"]["manifest_uri"].endswith("graft-manifest.json")
    assert os.path.exists(job["result"]["manifest_uri"].removeprefix("file://"))
    # tqdm's bar on stderr: the job by its id, the tensors, and 100% at the end
    bar = err.replace("\r", "\n")
    assert job["id"] in bar and "tensors" in bar and "100%|" in bar
    assert any(f"{job['id']} streaming" in line for line in bar.splitlines()), bar

    status, out, _ = graft("jobs", "get", job["id"])
    assert status == 0 and json.loads(out) == job
    status, out, _ = graft("jobs", "events", job["id"])
    types = [e["type"] for e in json.loads(out)["data"]]
    assert status == 0 and types[0] == "queued" and types[-1] == "finished"
    status, out, _ = graft("jobs", "list", "--status", "succeeded", "--all")
    assert status == 0 and job["id"] in [j["id"] for j in json.loads(out)["data"]]


def test_a_failing_job_exits_as_graft_run_does(graft, trio, service, tmp_path):
    missing = os.path.join(service.root, "no-such-model")
    body = tmp_path / "body.yaml"  # a body file, and --set over it
    body.write_text(yaml.safe_dump({"source_base": f"file://{missing}", "source_finetuned": "file://x",
                                    "target_base": f"file://{trio['target_base']}"}))
    status, out, err = graft("jobs", "submit", str(body), "--set", f"source_finetuned=file://{trio['source_finetuned']}",
                             "--set", "options.alpha=0.5")
    assert status == 0, err
    job_id = out.strip()
    status, out, err = graft("jobs", "wait", job_id, "--interval", "0.05")
    assert status == 2 and out == ""
    assert err.startswith("graft: error [input_not_found]: ") and missing in err

    local, _, local_err = graft("run", *_models(trio, source_base=f"file://{missing}"),
                                "--output", str(tmp_path / "out"))
    assert local == status and local_err.split(":", 2)[:2] == err.split(":", 2)[:2]


def test_cancel(graft, trio):
    status, out, err = graft("jobs", "submit", *_models(trio))
    assert status == 0, err
    job_id = out.strip()
    status, out, err = graft("jobs", "cancel", job_id)
    assert status == 0 and out.split() in ([job_id, "cancelled"], [job_id, "cancelling"]), (out, err)
    status, out, err = graft("jobs", "wait", job_id, "--interval", "0.05", "--json")
    assert status == 130 and json.loads(out)["status"] == "cancelled"
    assert f"{job_id} was cancelled; nothing was published" in err
    status, _, err = graft("jobs", "cancel", job_id)  # the server's 409, printed as graft prints errors
    assert status == 2 and err.startswith("graft: error [job_ended] (HTTP 409): ")


def test_refusals_are_printed_with_a_nonzero_exit(graft, trio, monkeypatch):
    status, _, err = graft("jobs", "submit", *_models(trio), "--set", "options.alpha=lots")
    assert status == 2 and err.startswith("graft: error [validation_error] (HTTP 422): options.alpha: ")
    status, _, err = graft("jobs", "get", "job_nope")
    assert status == 2 and err == "graft: error [not_found] (HTTP 404): no job job_nope\n"
    monkeypatch.setenv("GRAFT_API_KEY", "wrong-key")
    status, out, err = graft("jobs", "list")
    assert status == 2 and out == ""
    assert err == "graft: error [unauthorized] (HTTP 401): a valid `Authorization: Bearer <key>` header is required\n"


def test_the_client_starts_without_torch(service):
    code = ("import sys; from worker.cli import main; status = main(['jobs', 'list']); "
            "sys.exit(status or 9 * ('torch' in sys.modules))")
    env = {**os.environ, "GRAFT_SERVER": service.url, "GRAFT_API_KEY": KEYS["beta"]}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:] or "the client imported torch"
    assert json.loads(done.stdout)["object"] == "list"


def test_a_wait_rides_out_an_unavailable_server():
    """503s (with Retry-After) are asked again; a 404 is not; an error body that is not JSON is shown as text."""
    from worker.client.api import ApiError, Client
    from worker.client.follow import wait_for

    answers = [httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "away", "code": "unavailable"}),
               httpx.Response(502, text="<html>bad gateway</html>"),
               httpx.Response(200, json={"id": "job_1", "status": "running"}),
               httpx.Response(200, json={"id": "job_1", "status": "succeeded"}),
               httpx.Response(404, json={"detail": "no job job_1", "code": "not_found", "status": 404})]
    with Client("http://graft.test", "k", transport=httpx.MockTransport(lambda request: answers.pop(0))) as client:
        assert wait_for(client, "/v1/jobs/job_1", interval=0)["status"] == "succeeded"
        with pytest.raises(ApiError) as err:
            wait_for(client, "/v1/jobs/job_1", interval=0)
    assert err.value.lines() == ["graft: error [not_found] (HTTP 404): no job job_1"] and not answers
    assert ApiError("http_502", "<html>bad gateway</html>", status=502).transient


def test_diffs_extract_get_list_apply_delete(graft, trio):
    pair = [f"--source-base=file://{trio['source_base']}", f"--source-finetuned=file://{trio['source_finetuned']}"]
    status, out, err = graft("diffs", "extract", *pair, "--encoding", "sparse", "--set", "encoding.density=0.5",
                             "--wait", "--no-progress", "--interval", "0.05", "--json")
    assert status == 0, err
    job = json.loads(out)
    assert job["kind"] == "diff_extract" and job["options"]["encoding"] == {"encoding": "sparse", "density": 0.5}
    status, out, _ = graft("diffs", "get", job["id"])
    diff = json.loads(out)
    assert status == 0 and diff["status"] == "succeeded" and diff["totals"] == job["result"]["diff"]["totals"]
    status, out, _ = graft("diffs", "list", "--all")
    assert status == 0 and job["id"] in [d["id"] for d in json.loads(out)["data"]]
    status, out, err = graft("jobs", "submit", "--diff", job["id"], f"--target-base=file://{trio['target_base']}",
                             "--wait", "--no-progress", "--interval", "0.05", "--json")
    assert status == 0, err
    assert json.loads(out)["diff"] == diff["uri"]
    status, out, _ = graft("diffs", "delete", job["id"])
    assert status == 0 and json.loads(out)["status"] == "deleted"
    status, _, err = graft("jobs", "submit", "--diff", job["id"], f"--target-base=file://{trio['target_base']}")
    assert status == 2 and err.startswith(f"graft: error [validation_error] (HTTP 422): diff: diff {job['id']} "
                                          "was deleted")
    status, _, err = graft("diffs", "extract", *pair, "--set", "encoding.density=2", "--encoding", "sparse")
    assert status == 2 and "encoding.sparse.density" in err
