"""The API's contract without a worker: validation, auth and tenancy, URI policy, idempotency,
pagination, cancel of queued jobs, preview, health, and openapi.yaml agreeing with the app."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from service_fixtures import Service, job_body, local_graft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def api(redis_url, s3_endpoint, trio, tmp_path_factory):
    """An API whose queue no worker reads: jobs stay queued."""
    root = str(tmp_path_factory.mktemp("api"))
    service = Service(redis_url, root, s3_endpoint=s3_endpoint, GRAFT_ALLOWED_BUCKETS="allowed-bucket",
                      GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}")
    try:
        yield service.start_api()
    finally:
        service.stop()


def _problem(resp, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["type"] and body["title"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
        assert field in body["detail"]
    return body


@pytest.mark.parametrize("patch,field", [
    ({"options": {"alpha": "lots"}}, "options.alpha"),
    ({"options": {"alpha": "inf"}}, "options.alpha"),
    ({"options": {"vocab": "both"}}, "options.vocab"),
    ({"options": {"include": ["("]}}, "options.include"),
    ({"options": {"shard_size": "huge"}}, "options.shard_size"),
    ({"options": {"shard_size": 10}}, "options.shard_size"),
    ({"options": {"colour": "red"}}, "options.colour"),
    ({"source_base": ""}, "source_base"),
    ({"target_base": None}, "target_base"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"webhook_url": "ftp://example.com/x"}, "webhook_url"),
])
def test_validation_errors_name_the_field(api, trio, patch, field):
    with api.client() as c:
        _problem(c.post("/v1/jobs", json={**job_body(trio), **patch}), 422, field)


def test_missing_field_and_malformed_body(api, trio):
    with api.client() as c:
        body = job_body(trio)
        del body["source_finetuned"]
        _problem(c.post("/v1/jobs", json=body), 422, "source_finetuned")
        _problem(c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 400)


def test_auth_and_tenancy(api, trio):
    with api.client(None) as anon:
        _problem(anon.get("/v1/jobs"), 401)
        _problem(anon.post("/v1/jobs", json=job_body(trio)), 401)
        _problem(anon.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)
    with api.client("alpha") as a, api.client("beta") as b:
        job = a.post("/v1/jobs", json=job_body(trio)).json()
        _problem(b.get(f"/v1/jobs/{job['id']}"), 404)
        _problem(b.post(f"/v1/jobs/{job['id']}/cancel"), 404)
        _problem(b.get(f"/v1/jobs/{job['id']}/events"), 404)
        assert job["id"] not in [j["id"] for j in b.get("/v1/jobs?limit=100").json()["data"]]
        assert a.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
        _problem(a.get("/v1/jobs/job_doesnotexist"), 404)


def test_uri_policy(api, trio, tmp_path_factory):
    root = api.root
    outside = str(tmp_path_factory.mktemp("outside"))
    os.symlink(outside, os.path.join(root, "escape"))
    cases = [
        ("source_base", f"file://{root}/../../etc"),
        ("source_base", f"file://{root}/escape"),  # a symlink inside the root pointing outside
        ("source_base", f"file://{root}/models%00x"),  # a NUL byte, percent-encoded
        ("source_base", f"file://{outside}"),
        ("source_base", trio["source_base"]),  # bare path: no scheme
        ("source_base", "s3://other-bucket/models/x"),
        ("source_base", "s3://user@allowed-bucket/x"),
        ("source_base", "s3://allowed-bucket:9000/x"),
        ("source_base", "s3://allowed-bucket/x?endpoint=http://169.254.169.254"),
        ("source_base", "http://169.254.169.254/latest"),
        ("source_base", "file://evil.host/etc"),
        ("target_base", "hf://org/model"),  # hf disabled on this server
        ("output", f"file://{root}/escape/out"),
        ("output", "s3://other-bucket/out"),
        ("output", "hf://org/model"),
    ]
    with api.client() as c:
        for field, uri in cases:
            body = {**job_body(trio), field: uri}
            _problem(c.post("/v1/jobs", json=body), 422, field)
        ok = c.post("/v1/jobs", json={**job_body(trio), "output": "s3://allowed-bucket/out/x"})
        assert ok.status_code == 202, ok.text


def test_idempotency(api, trio):
    with api.client() as c:
        body = job_body(trio, metadata={"run": "idem"})
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert again.headers.get("idempotent-replayed") == "true"
        _problem(c.post("/v1/jobs", json={**body, "metadata": {"run": "other"}}, headers={"Idempotency-Key": "k-1"}),
                 422, "Idempotency-Key")
        ids = [j["id"] for j in c.get("/v1/jobs?limit=100").json()["data"]]
        assert ids.count(first.json()["id"]) == 1
        store = api.store()
        ttl = store.r.ttl(store.idem_key("alpha", __import__("hashlib").sha256(b"k-1").hexdigest()))
        assert ttl >= 24 * 3600
    with api.client("beta") as b:  # keys are per tenant
        assert b.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"}).json()["id"] != first.json()["id"]


def test_pagination_newest_first(api, trio):
    with api.client("beta") as c:
        made = [c.post("/v1/jobs", json=job_body(trio, metadata={"i": str(i)})).json()["id"] for i in range(7)]
        c.post(f"/v1/jobs/{made[3]}/cancel")
        seen, after = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 3, **({"after": after} if after else {})}).json()
            assert page["object"] == "list" and len(page["data"]) <= 3
            seen += [j["id"] for j in page["data"]]
            after = page["last_id"]
            if not page["has_more"]:
                break
        mine = [i for i in seen if i in made]
        assert mine == list(reversed(made))
        assert seen == sorted(seen, reverse=True)
        cancelled = c.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()
        assert made[3] in [j["id"] for j in cancelled["data"]]
        assert all(j["status"] == "cancelled" for j in cancelled["data"])
        _problem(c.get("/v1/jobs", params={"status": "bogus"}), 422, "query.status")
        _problem(c.get("/v1/jobs", params={"limit": 0}), 422, "query.limit")


def test_cancel_queued_and_409_when_ended(api, trio):
    with api.client() as c:
        job = c.post("/v1/jobs", json=job_body(trio)).json()
        resp = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
        assert resp.json()["finished_at"]
        _problem(c.post(f"/v1/jobs/{job['id']}/cancel"), 409)
        # RQ no longer holds it queued
        assert job["id"].encode() not in api.store().r.lrange(f"rq:queue:{api.queue}", 0, -1)
        types = [e["type"] for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert types == ["queued", "finished"]


def test_preview_matches_cli_plan(api, trio):
    from worker.engine import GraftOptions, GraftRequest, plan_graft
    from worker.engine.checks.inspect import headers_verdict
    from worker.engine.pipeline.resolve import close_models

    with api.client() as c:
        resp = c.post("/v1/jobs:preview", json=job_body(trio, options={"shard_size": "40KB"}))
        assert resp.status_code == 200, resp.text
        plan = resp.json()
    request = GraftRequest.single(trio["source_base"], trio["source_finetuned"], trio["target_base"], "",
                           GraftOptions(shard_size="40KB"))
    expected, models = plan_graft(request)
    try:
        preflight = headers_verdict(request, models, expected)
    finally:
        close_models(models)
    assert plan["object"] == "graft.plan"
    assert {k: v for k, v in plan.items() if k != "object"} == {**expected.to_dict(), "preflight": preflight}
    with api.client() as c:
        _problem(c.post("/v1/jobs:preview", json={**job_body(trio), "source_base": "file:///etc"}), 422, "source_base")
        missing = c.post("/v1/jobs:preview", json={**job_body(trio), "source_base": f"file://{api.root}"})
        _problem(missing, 422)


def test_health_ready_metrics(api, redis_url):
    with api.client(None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
        assert "graft_queue_depth" in c.get("/metrics").text
    broken = Service(redis_url, api.root, GRAFT_OUTPUT_URI="s3://no-such-bucket-here/x",
                     GRAFT_S3_ENDPOINT_URL=api.env["GRAFT_S3_ENDPOINT_URL"])
    try:
        broken.start_api()
        with broken.client(None) as c:
            resp = c.get("/readyz")
            assert resp.status_code == 503 and resp.json()["checks"]["storage"].startswith("error")
    finally:
        broken.stop()


def test_refuses_to_start_without_keys(redis_url, tmp_path):
    import subprocess
    import sys

    svc = Service(redis_url, str(tmp_path), GRAFT_API_KEYS="")
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--port", "1"], env=svc.env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "GRAFT_API_KEYS" in proc.stderr
    from app.main import create_app
    from worker.service.settings import Settings

    app = create_app(Settings(api_keys="", dev_mode=True, redis_url=redis_url))
    assert len(app.state.keys) == 1 and list(app.state.keys.values()) == ["dev"]
    assert all(len(k) == 64 for k in app.state.keys)  # only sha256 digests are held


def test_openapi_file_matches_app():
    from app.openapi_dump import spec

    with open(os.path.join(ROOT, "openapi.yaml")) as fh:
        on_disk = yaml.safe_load(fh)
    assert on_disk == spec(), "openapi.yaml drifted from the app: run `python -m app.openapi_dump`"
    paths = on_disk["paths"]
    for path, method in [("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"),
                         ("/v1/jobs/{job_id}/cancel", "post"), ("/v1/jobs/{job_id}/events", "get"),
                         ("/v1/jobs:preview", "post"), ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths[path]
    assert on_disk["components"]["schemas"]["Job"]["properties"]["status"]["$ref"].endswith("/JobStatus")
    statuses = on_disk["components"]["schemas"]["JobStatus"]["enum"]
    assert statuses == ["queued", "validating", "running", "committing", "succeeded", "failed", "cancelling",
                        "cancelled"]


def test_every_operation_has_a_unique_camel_case_id():
    """Clients generated from openapi.yaml name their methods after the operationIds: each is camelCase (never
    FastAPI's create_job_v1_jobs_post), unique, and a kind's is create<Noun>, from the kinds' table."""
    from app.openapi_dump import spec
    from worker.service.kinds import KINDS

    paths = spec()["paths"]
    ids = {(path, method): op.get("operationId") for path, item in paths.items() for method, op in item.items()}
    assert all(re.fullmatch(r"[a-z]+([A-Z][a-z0-9]*)*", i or "") for i in ids.values()), ids
    assert len(set(ids.values())) == len(ids), ids
    for kind in KINDS.values():
        noun = "".join(word.capitalize() for word in kind.route.noun.split("_"))
        assert ids[(f"/v1{kind.route.path}", "post")] == f"create{noun}"
    assert {"createJob", "createPreflight", "getJob", "listJobs", "cancelJob", "getJobEvents",
            "previewJob"} <= set(ids.values())


def test_compose_and_dockerfiles_are_well_formed():
    """What the deployment relies on, checked whether or not a compose tool is installed."""
    with open(os.path.join(ROOT, "docker-compose.yml")) as fh:
        compose = yaml.safe_load(fh)
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker", "worker-cpu"} <= set(services)
    assert "--appendonly" in " ".join(services["redis"]["command"])
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = os.path.join(ROOT, svc["build"].get("context", "."), svc["build"]["dockerfile"])
            assert os.path.exists(dockerfile), name
        for dep in svc.get("depends_on", {}):
            assert dep in services
    assert "mc mb" in " ".join(services["minio-init"]["entrypoint"] + services["minio-init"].get("command", []))


def _compose_command() -> list[str] | None:
    import shutil
    import subprocess

    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_config_passes():
    """The real `docker compose config` (or docker-compose v1, Debian's package) where one is installed."""
    import subprocess

    command = _compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    for profile in ([], ["--profile", "cpu"]):
        done = subprocess.run([*command, "-f", os.path.join(ROOT, "docker-compose.yml"), *profile, "config", "-q"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr


def test_local_graft_helper_is_deterministic(trio, tmp_path):
    """The byte-for-byte comparisons rely on two runs of the same job writing identical files."""
    from service_fixtures import compare_dirs, read_local

    a = local_graft(trio, str(tmp_path / "a"))
    b = local_graft(trio, str(tmp_path / "b"))
    compare_dirs(a, read_local(b))


@pytest.mark.parametrize("address", ["[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::ffff:10.0.0.1]"])
def test_webhook_urls_hiding_a_private_ipv4_in_ipv6_are_refused(address):
    from worker.service.webhooks import check_webhook_url

    with pytest.raises(ValueError):
        check_webhook_url(f"http://{address}/hook", allow_private=False)
    check_webhook_url("http://[2001:4860:4860::8888]/hook", allow_private=False)


def test_dangling_symlink_out_of_the_roots_is_refused(tmp_path):
    from worker.service.settings import Settings
    from worker.service.uri_policy import PolicyError, check_uri

    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere" / "missing")
    settings = Settings(allowed_roots=str(root))
    with pytest.raises(PolicyError):
        check_uri(f"file://{root}/out", "output", settings, output=True)
    assert check_uri(f"file://{root}/fresh", "output", settings, output=True).path == f"{root}/fresh"
