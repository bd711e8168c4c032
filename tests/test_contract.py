"""openapi.yaml against the running API, by schemathesis (bounded, deterministic): no server errors, every
status and body as documented, invalid data refused, schema-valid data refused only for reasons the schema
cannot state (tests/contract_hooks.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from service_fixtures import KEYS, Service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_keeps_its_openapi_contract(redis_url, trio, tmp_path):
    svc = Service(redis_url, str(tmp_path), GRAFT_ALLOWED_ROOTS=f"{tmp_path},{os.path.dirname(trio['source_base'])}",
                  GRAFT_WEBHOOK_ALLOW_PRIVATE=0, GRAFT_PREVIEW_WORKERS=1)
    try:
        svc.start_api()
        # A few variables only: requests scans the whole environment for proxy settings on every request
        # (seconds over the ~7,000 cases), and schemathesis needs none of the suite's.
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        env.update(SCHEMATHESIS_HOOKS="contract_hooks", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), ROOT]))
        # Two workers: one generates and checks cases (schemathesis' own CPU, most of the run) while the other
        # waits on the API; the cases are the same deterministic ones, in another order across operations.
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", os.path.join(ROOT, "openapi.yaml"),
             "--url", svc.url, "-H", f"Authorization: Bearer {KEYS['alpha']}", "--max-examples", "10",
             "--generation-deterministic", "--workers", "2", "--exclude-checks", "positive_data_acceptance",
             "--request-timeout", "30", "--no-color"],
            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert "refusals_of_valid_data_are_semantic" in done.stdout or "passed" in done.stdout
    finally:
        svc.stop()
