"""The checks through the service: POST /v1/preflights as a job of its own kind (report and chart published,
the verdict on the job), a graft job's evaluation, alpha sweep and `require: compatible`, and the refusals of
malformed checks."""

from __future__ import annotations

import json
import os

import pytest
from checks_models import PROBE, PROMPTS, checks_family
from service_fixtures import Service, wait_job


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("svc-checks-models")))


@pytest.fixture(scope="module")
def svc(redis_url, family, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("svc-checks"))
    models_root = os.path.dirname(family["base"])
    service = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{models_root}", GRAFT_PROBE_MAX_TOKENS="512",
                      GRAFT_SCRATCH_DIR=os.path.join(root, "scratch"))
    os.makedirs(os.path.join(root, "scratch"))
    try:
        service.start_api()
        service.start_worker()
        yield service
    finally:
        service.stop()


def _models(family, target: str, finetuned: str = "finetuned") -> dict:
    return {"source_base": f"file://{family['base']}", "source_finetuned": f"file://{family[finetuned]}",
            "target_base": f"file://{family[target]}"}


def _path(uri: str) -> str:
    assert uri.startswith("file://")
    return uri.removeprefix("file://")


def test_preflight_job_reports_and_publishes_its_chart(svc, family):
    with svc.client() as c:
        r = c.post("/v1/preflights", json={**_models(family, "near"), "level": "weights"})
        assert r.status_code == 202, r.text
        doc = r.json()
        assert doc["kind"] == "preflight" and doc["checks"] == {"preflight": {"level": "weights"}}
        near = wait_job(c, doc["id"], timeout=120)
        r = c.post("/v1/preflights", json={**_models(family, "unrelated"), "level": "function",
                                           "probe_text": PROBE})
        far = wait_job(c, r.json()["id"], timeout=120)
        assert c.get(f"/v1/jobs/{doc['id']}", headers={"Authorization": "Bearer beta-key"}).status_code in (401, 404)
    assert near["status"] == "succeeded", near.get("error")
    report = near["result"]["report"]
    assert report["verdict"] == "compatible" and report["levels_run"] == ["headers", "weights"]
    with open(os.path.join(_path(near["result"]["uri"]), "report.json")) as fh:
        assert json.load(fh)["verdict"] == "compatible"
    with open(_path(near["result"]["chart_uri"]), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(_path(near["result"]["uri"]), "graft-manifest.json"))
    assert far["status"] == "succeeded", far.get("error")
    assert far["result"]["report"]["verdict"] != "compatible"
    assert "function" in far["result"]["report"]["levels_run"], far["result"]["report"]["reasons"]
    assert far["checks"]["preflight"]["probe_text_chars"] == len(PROBE)  # shown by its length only


def test_graft_job_with_evaluation_and_quality_warning(svc, family):
    body = {**_models(family, "near"), "evaluate": {"probe_text": PROBE, "prompts": PROMPTS, "max_new_tokens": 3}}
    with svc.client() as c:
        good = wait_job(c, c.post("/v1/jobs", json=body).json()["id"], timeout=120)
        bad_id = c.post("/v1/jobs", json={**body, "options": {"alpha": 40.0}}).json()["id"]
        bad = wait_job(c, bad_id, timeout=120)
        events = c.get(f"/v1/jobs/{bad_id}/events").json()["data"]
    assert good["status"] == "succeeded", good.get("error")
    evaluation = good["result"]["evaluation"]
    assert evaluation["probe"]["tokens"] > 0 and evaluation["quality_warning"] is None
    with open(os.path.join(_path(good["result"]["uri"]), "graft-manifest.json")) as fh:
        assert json.load(fh)["evaluation"] == evaluation
    assert good["checks"]["evaluate"]["probe_text_chars"] == len(PROBE) and "probe_text" not in good["checks"]
    assert bad["status"] == "succeeded"  # advice, recorded: a quality warning does not block
    assert bad["result"]["evaluation"]["quality_warning"]["code"] == "quality_warning"
    assert "quality_warning" in [e["type"] for e in events]


def test_sweep_and_require_through_the_api(svc, family):
    with svc.client() as c:
        r = c.post("/v1/jobs", json={**_models(family, "base"), "options": {"alpha": [0.5, 1.0]},
                                     "select": "kl_to_finetuned", "evaluate": {"prompts": PROMPTS,
                                                                               "max_new_tokens": 2}})
        assert r.status_code == 202, r.text
        swept = wait_job(c, r.json()["id"], timeout=180)
        refused = wait_job(c, c.post("/v1/jobs", json={**_models(family, "unrelated"),
                                                        "require": "compatible"}).json()["id"], timeout=120)
    assert swept["status"] == "succeeded", swept.get("error")
    assert swept["result"]["sweep"]["chosen_alpha"] == 1.0 and swept["checks"]["alpha"] == [0.5, 1.0]
    assert os.listdir(os.path.join(svc.root, "scratch")) == []
    assert refused["status"] == "failed" and refused["error"]["code"] == "incompatible_bases"
    assert refused["error"]["details"]["preflight"]["verdict"] in ("risky", "incompatible")
    assert not os.path.exists(_path(refused["output"].rstrip("/")))


@pytest.mark.parametrize("patch, field", [
    ({"select": "probe_loss"}, "select"),
    ({"options": {"alpha": [1.0] * 9}}, "options.alpha"),
    ({"options": {"alpha": [0.5, "1"]}}, "options.alpha"),
    ({"evaluate": {"prompts": []}}, "evaluate.prompts"),
    ({"evaluate": {"max_new_tokens": 0}}, "evaluate.max_new_tokens"),
    ({"require": "risky"}, "require"),
])
def test_malformed_checks_are_refused_naming_the_field(svc, family, patch, field):
    with svc.client() as c:
        r = c.post("/v1/jobs", json={**_models(family, "near"), **patch})
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]]


def test_malformed_preflights_are_refused(svc, family):
    with svc.client() as c:
        assert c.post("/v1/preflights", json={**_models(family, "near"), "level": "deep"}).status_code == 422
        r = c.post("/v1/preflights", json={"source_base": f"file://{family['base']}", "target_base": "file:///etc"})
        assert r.status_code == 422
        r = c.post("/v1/preflights", json={**_models(family, "near"), "output": "file:///etc/graft"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "output"
        # 16 Ki + 1 characters of 4-byte UTF-8: within the schema's characters, past the bytes limit.
        r = c.post("/v1/preflights", json={**_models(family, "near"), "level": "function",
                                           "probe_text": "\U0001F600" * (16 * 1024 + 1)})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "probe_text", r.text
        r = c.post("/v1/preflights", json={**_models(family, "near"), "options": {"alpha": [0.5, 1.0]}})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "options.alpha"


def test_preview_carries_the_header_level_verdict(svc, family):
    with svc.client() as c:
        r = c.post("/v1/jobs:preview", json=_models(family, "near"))
    assert r.status_code == 200, r.text
    preflight = r.json()["preflight"]
    assert preflight["level"] == "headers" and preflight["verdict"] == "compatible"
    assert isinstance(preflight["reasons"], list)
