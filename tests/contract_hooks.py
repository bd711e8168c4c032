"""Schemathesis hooks for test_contract.py (loaded through SCHEMATHESIS_HOOKS).

A schema says which requests are well formed, not which models exist or which paths a tenant may use.
Schemathesis' `positive_data_acceptance` therefore gives way to this stricter reading: a schema-valid request
may be refused only with 422 for a reason no schema can state (the URI policy, a regular expression RE2
cannot compile, a webhook address that is not public, a configured size limit, a model that is not there,
a mergekit config that is no task-vector merge, a diff id that names none of the tenant's diffs),
and the refusal must say which; any other refusal of schema-valid data is a contract violation.
"""

from __future__ import annotations

import json

import schemathesis

SEMANTIC = {"uri_not_allowed", "invalid_option", "webhook_url_not_allowed", "webhook_url_invalid", "too_large",
            "input_not_found", "invalid_input", "invalid_safetensors", "shape_conflict", "vocab_mismatch",
            "invalid_recipe", "architecture_mismatch", "diff_not_found", "diff_deleted", "diff_not_ready"}


@schemathesis.check
def refusals_of_valid_data_are_semantic(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code in (401, 404, 409, 429, 503, 504):  # documented, not about the data's form
        return None
    assert response.status_code == 422, f"schema-valid data refused with {response.status_code}"
    body = json.loads(response.content)
    reasons = {e.get("type") for e in body.get("errors") or []} or {body.get("code")}
    assert reasons <= SEMANTIC, f"schema-valid data refused for {reasons - SEMANTIC}: {body.get('detail')}"
    return None
