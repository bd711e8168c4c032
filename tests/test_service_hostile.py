"""The API against a hostile tenant: authentication before any body is read, size and list limits, strict
types, per-tenant rate and job quotas, tenant namespaces, bounded previews (time, descriptors), and 503 while
Redis is away. Each test reproduces a defect found on an earlier main."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import httpx
import pytest
from service_fixtures import KEYS, Service, _descendants, job_body


def _problem(resp, status: int, field: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    if field is not None:
        fields = [e["field"] for e in body.get("errors", [])]
        assert any(f == field or f.startswith(field + ".") for f in fields), body
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.fixture(scope="module")
def api(redis_url, trio, tmp_path_factory):
    """No worker: jobs stay queued. The default outputs lie inside an allowed root, as in the tests' layout."""
    root = str(tmp_path_factory.mktemp("hostile"))
    service = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                      GRAFT_MAX_BODY_BYTES=64 << 10, GRAFT_TENANT_RATE_PER_MINUTE=0, GRAFT_PREVIEW_WORKERS=1,
                      GRAFT_WEBHOOK_ALLOW_PRIVATE=0)
    try:
        yield service.start_api()
    finally:
        service.stop()


def test_authentication_comes_before_the_body(api):
    with api.client(None) as anon:
        _problem(anon.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 401)
        _problem(anon.post("/v1/jobs", content=b"x" * (1 << 20), headers={"content-type": "application/json"}), 401)
        _problem(anon.get("/v1/nothing-here"), 401)  # an anonymous caller cannot map the routes


def test_oversized_bodies_get_413(api, trio):
    big = json.dumps({**job_body(trio), "metadata": {"k": "v" * 1000}, "pad": "x" * (70 << 10)}).encode()
    with api.client() as c:
        _problem(c.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413,
                 code="body_too_large")

        def chunks():  # no Content-Length: counted as it streams in
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]

        _problem(c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("patch,field", [
    ({"metadata": {"k": "v" * 1025}}, "metadata.k"),
    ({"metadata": {f"k{i}": "v" * 1000 for i in range(20)}}, "metadata"),  # 20 KB > GRAFT_MAX_METADATA_BYTES
    ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"options": {"include": ["a"] * 101}}, "options.include"),
    ({"options": {"exclude": ["a" * 1001]}}, "options.exclude.0"),
    ({"options": {"include": ["a{99999999999}"]}}, "options.include"),
    ({"options": {"include": ["(a)\\1"]}}, "options.include"),  # backreferences: not linear time
    ({"options": {"alpha": "1"}}, "options.alpha"),
    ({"options": {"alpha": True}}, "options.alpha"),
    ({"options": {"shard_size": 10**30}}, "options.shard_size"),
    ({"options": {"shard_size": "9" * 400}}, "options.shard_size"),
    ({"options": []}, "options"),
    ({"source_base": "s3://bucket]x/models"}, "source_base"),  # urlsplit's ValueError was a 500
    ({"webhook_url": "http://2130706433/hook"}, "webhook_url"),
    ({"webhook_url": "http://LOCALHOST./hook"}, "webhook_url"),
])
def test_limits_and_strict_types_name_the_field(api, trio, patch, field):
    with api.client() as c:
        body = _problem(c.post("/v1/jobs", json={**job_body(trio), **patch}), 422, field)
        assert "not a JSON object" not in body["detail"]


def test_numbers_where_numbers_belong_are_fine(api, trio):
    with api.client() as c:
        resp = c.post("/v1/jobs", json=job_body(trio, options={"alpha": 1, "shard_size": 1 << 20,
                                                               "include": ["(.|.)*Z"]}))
        assert resp.status_code == 202, resp.text
        assert resp.json()["options"]["alpha"] == 1.0


def test_method_not_allowed_lists_every_method(api):
    with api.client() as c:
        resp = c.request("OPTIONS", "/v1/jobs")
        _problem(resp, 405)
        assert {"GET", "POST"} <= {m.strip() for m in resp.headers["allow"].split(",")}


def test_pathological_regex_preview_is_fast_and_the_api_stays_up(api, trio):
    """On an earlier main `(.|.)*Z` froze the API's event loop (Python's backtracking re, under the GIL)."""
    answered = []

    def poll() -> None:
        with httpx.Client(base_url=api.url, timeout=5) as c:
            for _ in range(20):
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                answered.append(time.monotonic() - t0)
                time.sleep(0.05)

    with api.client() as c:
        c.post("/v1/jobs:preview", json=job_body(trio))  # the preview process starts (torch import) once
        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        resp = c.post("/v1/jobs:preview", json=job_body(trio, options={"include": ["(.|.)*Z" * 50]}))
        took = time.monotonic() - t0
        poller.join()
    assert resp.status_code == 200, resp.text
    assert took < 5, f"a preview with a pathological pattern took {took:.1f}s"
    assert max(answered) < 1.0, f"/healthz waited {max(answered):.2f}s during the preview"


def _fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in [pid, *_descendants(pid)] if os.path.exists(f"/proc/{p}"))


def test_previews_leak_no_descriptors(api, trio):
    """500 previews: the API process and its preview processes hold as many descriptors as after the first."""
    pid = api.procs[0].pid
    with api.client() as c:
        body = job_body(trio, options={"shard_size": "40KB"})
        assert c.post("/v1/jobs:preview", json=body).status_code == 200
        before = _fds(pid)
        errors = []

        def run(n: int) -> None:
            with api.client() as own:
                for _ in range(n):
                    resp = own.post("/v1/jobs:preview", json=body)
                    if resp.status_code != 200:
                        errors.append(resp.text)

        threads = [threading.Thread(target=run, args=(125,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        after = _fds(pid)
    assert after - before <= 8, f"descriptors grew from {before} to {after} over 500 previews"


def _slow_model(directory: str, tensors: int) -> None:
    """A valid model whose header is large enough that parsing it takes a while."""
    os.makedirs(directory)
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + bytes(4 * tensors))
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump({"model_type": "llama"}, fh)


def test_a_preview_that_overruns_is_stopped_and_the_next_one_works(redis_url, trio, tmp_path):
    root = str(tmp_path)
    _slow_model(os.path.join(root, "huge"), 400_000)
    svc = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                  GRAFT_PREVIEW_TIMEOUT=0.5, GRAFT_PREVIEW_WORKERS=1)
    try:
        svc.start_api()
        with svc.client() as c:
            c.post("/v1/jobs:preview", json=job_body(trio))  # warm: the 0.5 s budget is not for torch's import
            slow = {**job_body(trio), "source_base": f"file://{root}/huge", "source_finetuned": f"file://{root}/huge",
                    "target_base": f"file://{root}/huge"}
            _problem(c.post("/v1/jobs:preview", json=slow), 504, code="preview_timeout")
            assert c.get("/healthz").status_code == 200
            deadline = time.monotonic() + 20  # the replacement process warms up (imports torch) on its own
            while True:
                ok = c.post("/v1/jobs:preview", json=job_body(trio))
                if ok.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert ok.status_code == 200, ok.text
    finally:
        svc.stop()


def test_rate_limit_and_unfinished_quota_per_tenant(redis_url, trio, tmp_path):
    root = str(tmp_path)
    svc = Service(redis_url, root, GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                  GRAFT_TENANT_RATE_PER_MINUTE=60, GRAFT_TENANT_RATE_BURST=4, GRAFT_TENANT_MAX_UNFINISHED_JOBS=3)
    try:
        svc.start_api()
        with svc.client("alpha") as a, svc.client("beta") as b:
            made = [a.post("/v1/jobs", json=job_body(trio)) for _ in range(3)]
            assert [r.status_code for r in made] == [202, 202, 202]
            quota = _problem(a.post("/v1/jobs", json=job_body(trio)), 429, code="too_many_jobs")
            assert "3" in quota["detail"]
            limited = _problem(a.post("/v1/jobs", json=job_body(trio)), 429, code="rate_limited")
            assert 1 <= int(a.post("/v1/jobs", json=job_body(trio)).headers["retry-after"]) <= 60
            assert limited["status"] == 429
            assert b.post("/v1/jobs", json=job_body(trio)).status_code == 202  # the other tenant is untouched
            time.sleep(1.1)  # one token back at 60 a minute
            assert a.post(f"/v1/jobs/{made[0].json()['id']}/cancel").status_code == 200
            assert a.post("/v1/jobs", json=job_body(trio)).status_code == 202  # the cancel freed a slot
    finally:
        svc.stop()


def test_tenants_cannot_read_or_write_each_others_outputs(api, trio):
    root = api.root
    alpha_result = os.path.join(root, "outputs", "alpha", "job_published")
    os.makedirs(alpha_result)
    with open(os.path.join(alpha_result, "graft-manifest.json"), "w") as fh:
        fh.write("{}")
    os.symlink(alpha_result, os.path.join(root, "outputs", "beta-link"))
    with api.client("alpha") as a, api.client("beta") as b:
        job = a.post("/v1/jobs", json=job_body(trio)).json()
        assert job["output"] == f"file://{root}/outputs/alpha/{job['id']}"
        details = set()
        for field, uri in [("target_base", f"file://{alpha_result}"),
                           ("target_base", f"file://{root}/outputs/alpha/no-such-job"),  # same words: no probing
                           ("source_base", f"file://{root}/outputs/beta-link"),
                           ("source_base", f"file://{root}/outputs"),
                           ("output", f"file://{root}/outputs/alpha/mine-now"),
                           ("output", f"file://{root}/outputs/gamma/x")]:
            body = _problem(b.post("/v1/jobs", json={**job_body(trio), field: uri}), 422, field, "validation_error")
            details.add(body["errors"][0]["message"])
        assert len(details) == 1, details
        _problem(a.post("/v1/jobs", json={**job_body(trio), "output": f"file://{alpha_result}/inside"}), 422,
                 "output")
        _problem(b.post("/v1/jobs:preview", json={**job_body(trio), "target_base": f"file://{alpha_result}"}), 422,
                 "target_base")
        own = b.post("/v1/jobs", json={**job_body(trio), "output": f"file://{root}/outputs/beta/named"})
        assert own.status_code == 202, own.text


def test_redis_away_gives_503_with_retry_after():
    from fastapi.testclient import TestClient
    from service_fixtures import free_port

    from app.main import create_app
    from worker.service.settings import Settings

    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", api_keys=f"{KEYS['alpha']}:alpha"))
    with TestClient(app, raise_server_exceptions=False) as c:
        auth = {"Authorization": f"Bearer {KEYS['alpha']}"}
        for method, url in (("get", "/v1/jobs/job_x"), ("get", "/v1/jobs"), ("post", "/v1/jobs/job_x/cancel")):
            body = _problem(getattr(c, method)(url, headers=auth), 503, code="unavailable")
            assert body["instance"] == url
            assert int(c.get("/v1/jobs", headers=auth).headers["retry-after"]) > 0


def test_tenant_grants_open_a_prefix_to_one_tenant(redis_url, trio, tmp_path):
    """GRAFT_TENANT_GRANTS: a deployment gives one tenant a models directory (or S3 prefix) of its own."""
    import shutil

    root, private = tmp_path / "root", tmp_path / "beta-models"
    root.mkdir()
    shutil.copytree(trio["target_base"], private / "target")
    svc = Service(redis_url, str(root), GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}",
                  GRAFT_TENANT_GRANTS=f"beta=file://{private}|s3://beta-bucket/models",
                  GRAFT_ALLOWED_BUCKETS="shared-bucket")
    try:
        svc.start_api()
        with svc.client("alpha") as a, svc.client("beta") as b:
            for uri in (f"file://{private}/target", "s3://beta-bucket/models/x"):
                _problem(a.post("/v1/jobs", json={**job_body(trio), "target_base": uri}), 422, "target_base")
                assert b.post("/v1/jobs", json={**job_body(trio), "target_base": uri}).status_code == 202
            _problem(b.post("/v1/jobs", json={**job_body(trio), "target_base": "s3://beta-bucket/other"}), 422,
                     "target_base")
    finally:
        svc.stop()


def test_symlinked_files_inside_a_model_cannot_lead_out(redis_url, trio, tmp_path):
    """A link to a file outside the roots, inside an allowed model directory: refused by the preview and by
    the job, which fails cleanly without publishing anything (the worker checks every opened file)."""
    import shutil

    from service_fixtures import wait_job

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text('{"stolen": true}')
    finetuned = root / "finetuned"
    shutil.copytree(trio["source_finetuned"], finetuned)
    (finetuned / "tokenizer_config.json").unlink()
    (finetuned / "tokenizer_config.json").symlink_to(outside / "secret.json")
    svc = Service(redis_url, str(root), GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(trio['source_base'])}")
    try:
        svc.start_api()
        svc.start_worker()
        body = {**job_body(trio), "source_finetuned": f"file://{finetuned}"}
        with svc.client() as c:
            preview = _problem(c.post("/v1/jobs:preview", json=body), 422, code="uri_not_allowed")
            assert "secret" not in preview["detail"] and str(outside) not in preview["detail"]
            job = c.post("/v1/jobs", json=body).json()
            done = wait_job(c, job["id"], timeout=90)
        assert done["status"] == "failed" and done["error"]["code"] == "uri_not_allowed", done
        assert not os.path.exists(done["output"].removeprefix("file://"))
    finally:
        svc.stop()


def test_a_plain_jobs_recipe_is_the_one_the_cli_builds(api, trio):
    """The job record holds the request as a recipe: for the three fields and alpha, the one-diff recipe whose
    weight is alpha, as `graft run` builds it (the record, the manifest and the docs agree whichever face)."""
    from worker.engine.planning.options import GraftOptions
    from worker.engine.planning.recipe import Recipe

    uris = {role: f"file://{trio[role]}" for role in ("source_base", "source_finetuned", "target_base")}
    with api.client() as c:
        job = c.post("/v1/jobs", json={**uris, "options": {"alpha": 0.5}}).json()
    cli = Recipe.single(uris["source_base"], uris["source_finetuned"], uris["target_base"],
                        GraftOptions(alpha=0.5)).to_dict()
    recorded = job["recipe"]
    assert GraftOptions(**recorded.pop("options")) == GraftOptions(**cli.pop("options"))  # "5GB" is 5e9 bytes
    assert recorded == cli and recorded["diffs"][0]["weight"] == 0.5
    assert recorded["merge"]["lambda"] == 1.0 and job["options"]["alpha"] == 0.5


def test_recipe_fields_are_validated_like_the_rest(api, trio):
    """A recipe's regexes, methods and URIs get named 422s (a regex RE2 refuses was a 500), and alpha beside
    diffs scales their merged delta (the merge's lambda), their weights as given."""
    diffs = [{"source_base": f"file://{trio['source_base']}", "source_finetuned": f"file://{trio['source_finetuned']}",
              "weight": [0.5, 1.0]}]
    base = {"target_base": f"file://{trio['target_base']}", "diffs": diffs}
    with api.client() as c:
        for patch, field in [({"rules": [{"match": "(a)\\1", "weight": 0.0}]}, "rules.0"),
                             ({"rules": [{"match": "x"}]}, "rules.0"),
                             ({"merge": {"method": "nope"}}, "merge"),
                             ({"merge": {"method": "ties", "density": 0}}, "merge"),
                             ({"diffs": [{**diffs[0], "source_finetuned": "file:///etc"}]},
                              "diffs.0.source_finetuned")]:
            _problem(c.post("/v1/jobs", json={**base, **patch}), 422, field)
        job = c.post("/v1/jobs", json={**base, "options": {"alpha": 0.5}}).json()
        assert job["recipe"]["diffs"][0]["weight"] == [0.5, 1.0] and job["recipe"]["merge"]["lambda"] == 0.5
