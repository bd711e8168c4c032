"""The table of job kinds (worker/service/kinds): every registered kind has a runner of the runners' signature,
the API's schema lists exactly the table's kinds, records name their kind (old ones are grafts), the API never
imports torch for the table, and a kind registered by one line gets its route, its OpenAPI entry and the
worker's dispatch with no other edit."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types
import uuid

import pytest
from pydantic import Field
from service_fixtures import job_body

from worker.engine.errors import GraftError
from worker.service.kinds import KINDS, Route, kind_of, register
from worker.service.kinds.bodies import BodyError, Models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kind_has_a_runner_of_the_runners_signature():
    assert list(KINDS) == ["graft", "preflight", "diff_extract", "lora_export"]
    for kind in KINDS.values():
        assert list(inspect.signature(kind.runner).parameters) == ["request", "spec", "settings", "reporter"], kind


def test_records_name_their_kind_and_old_records_are_grafts():
    assert kind_of({"kind": "preflight"}) is KINDS["preflight"]
    assert kind_of({}) is KINDS["graft"] and kind_of({"kind": None}) is KINDS["graft"]
    with pytest.raises(GraftError) as err:  # a record of a newer API's kind: the job fails by name
        kind_of({"kind": "quantize"})
    assert err.value.code == "unknown_kind" and "'quantize'" in err.value.message


def test_the_api_schema_lists_the_kinds():
    from app.openapi_dump import spec

    assert spec()["components"]["schemas"]["JobKind"]["enum"] == list(KINDS)


def test_the_api_imports_the_table_without_torch():
    code = ("import sys; from app.openapi_dump import spec; import worker.service.jobs; spec(); "
            "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] or "the API imported torch"


def test_registration_refuses_what_is_not_a_kind():
    with pytest.raises(TypeError, match="missing run"):
        register(types.SimpleNamespace(NAME="half", Body=Models, ROUTE=Route("/halves", "half", "x"),
                                       spec=lambda body: None))
    with pytest.raises(TypeError, match="Body must extend"):
        register(types.SimpleNamespace(NAME="odd", Body=dict, ROUTE=Route("/odds", "odd", "x"),
                                       spec=lambda body: None, run=lambda *a: {}))
    with pytest.raises(ValueError, match="collides with 'graft'"):
        register(types.SimpleNamespace(NAME="other", Body=Models, ROUTE=Route("/jobs", "other", "x"),
                                       spec=lambda body: None, run=lambda *a: {}))
    assert list(KINDS) == ["graft", "preflight", "diff_extract", "lora_export"]


# The toy kind: one module-like object. Its runner publishes what it was given, through the same publishing
# context every kind uses (claim, stage, manifest last).
class ToyCreate(Models):
    note: str = Field(max_length=64, description="what the toy writes")


def _toy_check(body: ToyCreate) -> None:
    if body.note == "refuse me":
        raise BodyError("note", "the toy refuses this note", "invalid_note")


def _toy_run(request, spec, settings, reporter) -> dict:
    from worker.engine.pipeline.publish import publishing
    from worker.engine.storage.uris import parse_uri

    output = parse_uri(request.output, field="output")
    with publishing(output, request, settings, reporter.should_cancel) as sink:
        record = sink.put("toy.json", json.dumps({"target": request.recipe.target_base, **spec}).encode())
        manifest_uri = sink.commit(json.dumps({"format": "toy/1", "files": [record.to_dict()]}).encode())
    return {"uri": str(output), "manifest_uri": manifest_uri, "files": [record.to_dict()],
            "stats": {"tensors": 0, "bytes_read": 0, "bytes_written": record.size}}


TOY = types.SimpleNamespace(
    NAME="toy", Body=ToyCreate, check=_toy_check, run=_toy_run,
    ROUTE=Route("/toys", "toy", "Write a toy file", "A kind that exists only in this test.",
                {409: "a toy already sits at the output"}),
    spec=lambda body: {"toy": {"note": body.note}},
    shown=lambda spec: {"toy": {"note_chars": len(spec["toy"]["note"])}})


@pytest.fixture
def toy_kind():
    register(TOY)  # the one registration line a new kind adds
    try:
        yield KINDS["toy"]
    finally:
        KINDS.pop("toy")


@pytest.fixture
def toy_service(redis_url, trio, tmp_path, monkeypatch, toy_kind):
    """The app and the worker's environment in this process (the toy is registered here, not in a child's)."""
    tag = uuid.uuid4().hex[:8]
    env = {"GRAFT_REDIS_URL": redis_url, "GRAFT_KEY_PREFIX": f"test-{tag}:", "GRAFT_QUEUE_NAME": f"test-{tag}",
           "GRAFT_API_KEYS": "toy-key-123:toys", "GRAFT_OUTPUT_URI": f"file://{tmp_path}/outputs",
           "GRAFT_ALLOWED_ROOTS": f"{tmp_path},{os.path.dirname(trio['source_base'])}", "GRAFT_CACHE_DIR": "",
           "GRAFT_TENANT_RATE_PER_MINUTE": "0", "GRAFT_TENANT_MAX_UNFINISHED_JOBS": "0", "GRAFT_HF_ENABLED": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from fastapi.testclient import TestClient

    from app.main import create_app
    from worker.service.settings import Settings

    app = create_app(Settings())
    with TestClient(app, headers={"Authorization": "Bearer toy-key-123"}) as client:
        yield app, client


def test_a_registered_kind_gets_a_route_an_openapi_entry_and_the_workers_dispatch(toy_service, trio, tmp_path):
    app, client = toy_service
    operation = app.openapi()["paths"]["/v1/toys"]["post"]
    assert operation["operationId"] == "createToy" and operation["summary"] == "Write a toy file"
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ToyCreate"}
    assert {"202", "400", "401", "409", "413", "422", "429", "503"} <= set(operation["responses"])
    assert operation["responses"]["409"]["description"] == "a toy already sits at the output"
    schemas = app.openapi()["components"]["schemas"]
    assert schemas["JobKind"]["enum"] == ["graft", "preflight", "diff_extract", "lora_export", "toy"]
    assert "note" in schemas["ToyCreate"]["properties"] and "target_base" in schemas["ToyCreate"]["properties"]

    body = job_body(trio)
    refused = client.post("/v1/toys", json={**body, "note": "refuse me"})
    assert refused.status_code == 422 and refused.json()["errors"][0] == {
        "field": "note", "message": "the toy refuses this note", "type": "invalid_note"}
    assert client.post("/v1/toys", json={**body, "note": "x", "level": "weights"}).status_code == 422  # not its field
    made = client.post("/v1/toys", json={**body, "note": "hello"})
    assert made.status_code == 202, made.text
    job = made.json()
    assert job["kind"] == "toy" and job["checks"] == {"toy": {"note_chars": 5}} and job["status"] == "queued"
    assert job["output"] == f"file://{tmp_path}/outputs/toys/{job['id']}"

    from rq import Queue, SimpleWorker

    from worker.service.settings import get_settings

    settings = get_settings()
    state = app.state.graft
    # RQ's own worker, in this process: it runs worker.service.jobs.run_job, whose dispatch reads the table.
    SimpleWorker([Queue(settings.queue_name, connection=state.redis)], connection=state.redis).work(burst=True)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["result"]["manifest_uri"] == f"{job['output']}/graft-manifest.json"
    written = job["output"].removeprefix("file://")
    assert sorted(os.listdir(written)) == ["graft-manifest.json", "toy.json"]
    with open(os.path.join(written, "toy.json")) as fh:  # the spec reached the runner whole, the recipe too
        assert json.load(fh) == {"target": body["target_base"], "toy": {"note": "hello"}}
