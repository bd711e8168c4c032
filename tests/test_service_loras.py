"""LoRA adapters through the real HTTP API and a real RQ worker: POST /v1/loras exports one (a job) that PEFT loads,
whose factors are as close to the delta as its manifest says (a float64 reference here), GET and list show its
summary, a diff's id gives the pair's adapter bit for bit, another tenant can neither see nor use it, bad input
is a 422 naming the field, idempotency replays, and deleting removes its files. A cancelled export publishes
nothing, and the tenant's job quota and webhooks hold for the kind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from safetensors.torch import load_file
from service_fixtures import KEYS, Service, read_local, submit_and_wait, wait_job

from worker.engine.pipeline.lora_request import LoraExport

ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "lora-manifest.json"}
ALPHA = 0.5


def _service(redis_url, trio, root: str, **env) -> Service:
    return Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}", **env)


@pytest.fixture(scope="module")
def svc(redis_url, trio, tmp_path_factory):
    service = _service(redis_url, trio, str(tmp_path_factory.mktemp("loras")))
    try:
        service.start_worker()  # first: its start (imports, registration) overlaps the API's
        service.start_api()
        yield service
    finally:
        service.stop()


def _pair(trio: dict) -> dict:
    return {"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}"}


def _target(trio: dict) -> dict:
    return {"target_base": f"file://{trio['target_base']}"}


def _export(c, body: dict, timeout: float = 60, **headers) -> dict:
    return submit_and_wait(c, "/v1/loras", body, "lora_export", headers, timeout=timeout)


@pytest.fixture(scope="module")
def lora(svc, trio) -> dict:
    """One rank-8 vllm adapter of the trio's pair, exported by the service into alpha's namespace."""
    with svc.client() as c:
        return _export(c, {**_pair(trio), **_target(trio), "rank": 8, "alpha": ALPHA, "metadata": {"team": "a"}},
                       **{"Idempotency-Key": "lora-one"})


def _state(path: str) -> dict[str, np.ndarray]:
    """A checkpoint's tensors in float64 (bf16 widens exactly)."""
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update({k: v.double().numpy() for k, v in load_file(os.path.join(path, name)).items()})
    return out


def test_an_export_is_a_peft_adapter_with_its_summary(svc, lora, trio):
    out = lora["output"].removeprefix("file://")
    assert lora["output"] == f"file://{svc.root}/outputs/alpha/{lora['id']}"
    assert set(os.listdir(out)) == ADAPTER
    with open(os.path.join(out, "lora-manifest.json")) as fh:
        manifest = json.load(fh)
    with open(os.path.join(out, "adapter_config.json")) as fh:
        config = json.load(fh)
    # every parameter of the engine's model is in the record, with the model's defaults: the body is the model's
    assert set(lora["options"]) == set(LoraExport.model_fields) - {"source_base", "source_finetuned", "diff",
                                                                   "target_base", "output"}
    assert lora["options"]["rank"] == 8 and lora["options"]["profile"] == "vllm" and lora["recipe"] is None
    assert config["r"] == manifest["rank"] == 8 and config["peft_type"] == "LORA"
    # the factors against a float64 reference of the delta: the error the manifest states, alpha in lora_B
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    s, f, t = _state(trio["source_base"]), _state(trio["source_finetuned"]), _state(trio["target_base"])
    assert set(tensors) == {f"base_model.model.{m}.lora_{ab}.weight" for m in config["target_modules"]
                            for ab in "AB"}
    for module in config["target_modules"]:
        delta = f[module + ".weight"] - s[module + ".weight"]
        a, b = (tensors[f"base_model.model.{module}.lora_{ab}.weight"].double().numpy() for ab in "AB")
        assert a.shape == (8, t[module + ".weight"].shape[1]) and b.shape == (t[module + ".weight"].shape[0], 8)
        error = np.linalg.norm(ALPHA * delta - b @ a) / np.linalg.norm(ALPHA * delta)
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert np.sqrt((sigma[8:] ** 2).sum()) / np.linalg.norm(delta) - 1e-6 <= error  # no rank 8 does better
        assert abs(manifest["modules"][module]["rel_frobenius"] - error) < 1e-5, module
    with svc.client() as c:
        got = c.get(f"/v1/loras/{lora['id']}").json()
        listed = c.get("/v1/loras", params={"limit": 100}).json()
        again = c.post("/v1/loras", json={**_pair(trio), **_target(trio), "rank": 8, "alpha": ALPHA,
                                          "metadata": {"team": "a"}}, headers={"Idempotency-Key": "lora-one"})
        events = [e["type"] for e in c.get(f"/v1/jobs/{lora['id']}/events").json()["data"]]
        assert c.get(f"/v1/loras/{lora['id']}x").status_code == 404
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == lora["id"]
    assert events[:2] == ["queued", "started"] and events[-1] == "finished" and "phase" in events
    assert got["object"] == "graft.lora" and got["status"] == "succeeded" and got["job"] == f"/v1/jobs/{lora['id']}"
    assert got["rank"] == 8 and got["profile"] == "vllm" and got["metadata"] == {"team": "a"}
    assert got["uri"] == lora["output"] and got["manifest_uri"] == f"{lora['output']}/lora-manifest.json"
    assert got["source_base"] == _pair(trio)["source_base"] and got["diff"] is None
    assert got["inputs"]["target_base"] == _target(trio)["target_base"]
    assert set(got["inputs"]["files"]) == {"source_base", "source_finetuned", "target_base"}
    on_disk = read_local(out)
    assert got["bytes"] == sum(len(on_disk[n]) for n in ADAPTER - {"lora-manifest.json"})
    assert {x["path"] for x in got["files"]} == ADAPTER - {"lora-manifest.json"}
    assert got["totals"] == manifest["totals"]
    assert got["modules"]["count"] == len(manifest["modules"]) == 7 * 2  # 7 linear modules per layer, 2 layers
    groups = got["modules"]["groups"]
    assert sum(g["count"] for g in groups.values()) == 14 and groups["model.layers.*.mlp.down_proj"]["count"] == 2
    assert groups["model.layers.*.mlp.down_proj"]["rel_frobenius_max"] == max(
        manifest["modules"][f"model.layers.{i}.mlp.down_proj"]["rel_frobenius"] for i in range(2))
    # vllm: norms, embeddings and lm_head left out, each with its share of ||delta||^2
    left = got["left_out"]
    assert left["tensors"] == len(manifest["left_out"]) > 0
    assert abs(left["share"] - manifest["totals"]["left_out_share"]) < 1e-12
    shown = {name for g in left["groups"] for name in g["examples"]}
    assert "model.norm.weight" in shown and "model.embed_tokens.weight" in shown
    assert lora["id"] in [x["id"] for x in listed["data"]] and listed["object"] == "list"


def test_peft_loads_the_adapter(lora, trio):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    out = lora["output"].removeprefix("file://")
    model = transformers.AutoModelForCausalLM.from_pretrained(trio["target_base"], torch_dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.PeftConfig.from_pretrained(out))
    result = peft.set_peft_model_state_dict(wrapped, load_file(os.path.join(out, "adapter_model.safetensors")))
    assert [k for k in result.missing_keys if "lora_" in k] == [] and list(result.unexpected_keys) == []


def test_a_diff_by_id_gives_the_pairs_adapter(svc, lora, trio):
    with svc.client() as c:
        diff = c.post("/v1/diffs", json=_pair(trio)).json()
        assert wait_job(c, diff["id"])["status"] == "succeeded"
        by_id = _export(c, {"diff": diff["id"], **_target(trio), "rank": 8, "alpha": ALPHA})
    assert by_id["diff"] == f"file://{svc.root}/outputs/alpha/{diff['id']}"  # the id resolved to its artifact
    assert by_id["source_base"] is None
    pair, art = (read_local(x["output"].removeprefix("file://"))["adapter_model.safetensors"] for x in (lora, by_id))
    assert pair == art  # exact diff: the same delta, the same factors, bit for bit


def test_an_export_naming_a_deleted_diff_fails_or_is_refused(svc, trio):
    with svc.client() as c:
        diff = submit_and_wait(c, "/v1/diffs", {**_pair(trio), "encoding": "bf16"}, "diff_extract")
        os.kill(svc.workers[0].pid, signal.SIGSTOP)  # idle: what is queued stays queued until it resumes
        try:
            queued = c.post("/v1/loras", json={"diff": diff["id"], **_target(trio), "rank": 1}).json()
            assert c.delete(f"/v1/diffs/{diff['id']}").json()["status"] == "deleted"
        finally:
            os.kill(svc.workers[0].pid, signal.SIGCONT)
        failed = wait_job(c, queued["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "diff_deleted", failed
        assert not os.path.exists(failed["output"].removeprefix("file://"))  # refused before anything was written
        for ref in (diff["id"], diff["output"]):
            refused = c.post("/v1/loras", json={"diff": ref, **_target(trio)})
            assert refused.status_code == 422 and refused.json()["errors"][0] == {
                "field": "diff", "message": refused.json()["errors"][0]["message"], "type": "diff_deleted"}


def test_a_rank_sweep_through_the_api_publishes_its_pick_with_the_curve(svc):
    """The kind runs the engine's checked driver: ranks are scored against the full graft and the smallest rank
    within max_kl is what is published, the curve shown on the job and on GET /v1/loras/{id}."""
    from checks_models import checks_family  # a family with tokenizers: the evaluation runs the models

    family = checks_family(os.path.join(svc.root, "family"))
    body = {"source_base": f"file://{family['base']}", "source_finetuned": f"file://{family['finetuned']}",
            "target_base": f"file://{family['near']}", "ranks": [1, 8], "profile": "peft", "max_kl": 100.0}
    with svc.client() as c:
        job = _export(c, body, timeout=300)  # a full graft and two evaluations a rank
        shown = c.get(f"/v1/loras/{job['id']}").json()
        events = c.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases.index("evaluating") < phases.index("streaming"), phases  # the sweep says where it is
    fidelity = job["result"]["lora"]["fidelity"]
    assert [row["rank"] for row in fidelity["curve"]] == [1, 8]
    assert fidelity["picked_rank"] == 1 and job["result"]["lora"]["rank"] == 1  # both within a KL of 100
    assert all(row["kl_to_full_graft"] >= 0 for row in fidelity["curve"])
    config = json.loads(read_local(job["output"].removeprefix("file://"))["adapter_config.json"])
    assert config["r"] == 1
    assert json.dumps(shown).count('"picked_rank": 1') == 1


def test_another_tenant_can_neither_see_nor_use_it(svc, lora, trio):
    with svc.client("beta") as c:
        assert c.get(f"/v1/loras/{lora['id']}").status_code == 404
        assert c.delete(f"/v1/loras/{lora['id']}").status_code == 404
        assert lora["id"] not in [x["id"] for x in c.get("/v1/loras").json()["data"]]
        # nor alpha's diffs: an id that is not beta's reads as none
        someone_elses = c.post("/v1/loras", json={"diff": "job_" + "0" * 24, **_target(trio)})
    assert someone_elses.status_code == 422 and someone_elses.json()["errors"][0]["type"] == "diff_not_found"
    with svc.client() as c:
        assert c.get(f"/v1/loras/{lora['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(("extra", "field", "kind"), [
    ({"rank": 0}, "rank", "greater_than_equal"),
    ({"rank": 5000}, "rank", "less_than_equal"),
    ({"rank": 1000}, "rank", "invalid_option"),  # within the model's range, beyond vLLM's 512
    ({"rank": 8, "energy": 0.9}, "rank", "invalid_option"),
    ({"modules": "(unclosed"}, "modules", "invalid_option"),
    ({"diff": "file:///x"}, "source_base", "invalid_option"),  # both a pair and a diff
    ({"profile": "onnx"}, "profile", "literal_error"),
    ({"output": "http://x/y"}, "output", "string_pattern_mismatch"),
    ({"source_base": "file:///etc"}, "source_base", "uri_not_allowed"),
])
def test_bad_input_is_a_422_naming_the_field(svc, trio, extra, field, kind):
    with svc.client() as c:
        resp = c.post("/v1/loras", json={**_pair(trio), **_target(trio), **extra})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json", resp.text
    assert (resp.json()["errors"][0]["field"], resp.json()["errors"][0]["type"]) == (field, kind)


def test_neither_a_pair_nor_a_diff_is_a_422(svc, trio):
    with svc.client() as c:
        resp = c.post("/v1/loras", json={"source_base": _pair(trio)["source_base"], **_target(trio)})
    assert resp.status_code == 422 and "source_finetuned, or diff" in resp.json()["detail"]


def test_deleting_removes_its_files(svc, trio):
    with svc.client() as c:
        made = _export(c, {**_pair(trio), **_target(trio), "rank": 1})
        out = made["output"].removeprefix("file://")
        assert set(os.listdir(out)) == ADAPTER
        deleted = c.delete(f"/v1/loras/{made['id']}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "deleted" and deleted.json()["deleted_at"]
        assert not os.path.exists(out)
        assert made["id"] not in [x["id"] for x in c.get("/v1/loras").json()["data"]]
        assert c.get(f"/v1/loras/{made['id']}").json()["status"] == "deleted"
        assert c.delete(f"/v1/loras/{made['id']}").json()["status"] == "deleted"  # again: nothing left to do
        assert "lora_deleted" in [e["type"] for e in c.get(f"/v1/jobs/{made['id']}/events").json()["data"]]


def test_the_client_exports_gets_lists_and_deletes(svc, trio, monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.setenv("GRAFT_API_KEY", KEYS["alpha"])

    def graft(*argv: str) -> tuple[int, str, str]:
        status = main([*argv, "--server", svc.url])
        out = capsys.readouterr()
        return status, out.out, out.err

    models = [f"--{role.replace('_', '-')}={uri}" for role, uri in {**_pair(trio), **_target(trio)}.items()]
    status, out, err = graft("loras", "export", *models, "--rank", "4", "--profile", "peft", "--set", "seed=3",
                             "--wait", "--interval", "0.05", "--json")
    assert status == 0, err
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["options"]["profile"] == "peft" and job["options"]["seed"] == 3
    assert set(os.listdir(job["output"].removeprefix("file://"))) == ADAPTER
    status, out, _ = graft("loras", "get", job["id"])
    assert status == 0 and json.loads(out)["rank"] == 4 and json.loads(out)["modules_to_save"]  # peft: norms
    status, out, _ = graft("loras", "list", "--all")
    assert status == 0 and job["id"] in [x["id"] for x in json.loads(out)["data"]]
    status, out, _ = graft("loras", "delete", job["id"])
    assert status == 0 and json.loads(out)["status"] == "deleted"
    # refusals as graft prints errors (exit 2); a job that fails exits as graft run would (2, its code)
    status, _, err = graft("loras", "export", *models, "--modules", "(")
    assert status == 2 and "modules" in err
    status, _, err = graft("loras", "export", *models[:2], f"--target-base=file://{svc.root}/missing", "--wait")
    assert status == 2 and "error [" in err


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        _Receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_cancelled_export_publishes_nothing(redis_url, trio, tmp_path):
    """A worker slowed to 0.5 s a module (14 modules); one unfinished job per tenant."""
    service = _service(redis_url, trio, str(tmp_path), GRAFT_JOB_BLOCK_DELAY=0.5, GRAFT_TENANT_MAX_UNFINISHED_JOBS=1,
                       GRAFT_PROGRESS_INTERVAL=0.05)
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.bodies = []
    try:
        service.start_worker()
        service.start_api()
        body = {**_pair(trio), **_target(trio), "rank": 8,
                "webhook_url": f"http://127.0.0.1:{server.server_port}/hook"}
        with service.client() as c:
            job = c.post("/v1/loras", json=body).json()
            running = wait_job(c, job["id"], until=("running", "succeeded", "failed", "cancelled"), timeout=60)
            assert running["status"] == "running", running
            over_quota = c.post("/v1/loras", json={**body, "webhook_url": None})
            deadline = time.time() + 30
            while (running.get("progress") or {}).get("tensors_done", 0) < 1 and time.time() < deadline:
                time.sleep(0.05)
                running = c.get(f"/v1/jobs/{job['id']}").json()
            assert running["progress"]["tensors_total"] == 14 and running["progress"]["tensors_done"] < 14
            assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
            done = wait_job(c, job["id"], timeout=30)
            assert done["status"] == "cancelled" and done["result"] is None
            assert c.get("/v1/loras").json()["data"] == []
            assert c.delete(f"/v1/loras/{job['id']}").json()["code"] == "lora_unfinished"
        assert over_quota.status_code == 429, over_quota.text
        out = job["output"].removeprefix("file://")
        assert not os.path.exists(out) or not set(os.listdir(out)) & ADAPTER
        deadline = time.time() + 20
        while not _Receiver.bodies and time.time() < deadline:
            time.sleep(0.1)
        assert [(b["type"], b["data"]["id"]) for b in _Receiver.bodies] == [("graft.job.cancelled", job["id"])]
    finally:
        server.shutdown()
        service.stop()
