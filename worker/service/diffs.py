"""Diffs as the service keeps them: a diff is the artifact a succeeded `diff_extract` job published, known by that
job's id; its record, listing and deletion are a kind's collection's (worker/service/collections.py, `DIFFS`).
What is a diff's own: jobs read diffs, by id or by URI.

- `diffs:deleted` (the collection's deleted URIs): every job naming a deleted diff's artifact, by id or by URI, is
  refused at submission and failed by the worker (`diff_deleted`).

Deleting goes in the collection's order (the mark, then the manifest, then the rest), so that no job ever
publishes from a partly removed artifact: a queued job sees the mark before it resolves anything and fails
`diff_deleted`; a running one that opened the artifact before the mark either reads what it verified (a local
file stays readable through its open descriptor) or fails on what is gone, and then fails `diff_deleted` too; its
output is never committed from missing bytes, and a retry meets the mark.
"""

from __future__ import annotations

import re

from worker.service.collections import Collection, Refused, field_of, normal_uri
from worker.service.job_store import JobStore
from worker.service.kinds.bodies import DIFF_ID_PATTERN
from worker.service.kinds.recipes import recipe_diffs
from worker.service.statuses import JobStatus

KIND = "diff_extract"
DIFF_ID = re.compile(DIFF_ID_PATTERN)
DiffRefused = Refused  # a diff reference refused: diff_not_found, diff_deleted, diff_not_ready


def _fields(job: dict) -> dict:
    """What a diff shows of its extraction: provenance, encoding, sizes and reconstruction errors."""
    summary = (job.get("result") or {}).get("diff") or {}
    options = job.get("options") or {}
    return {"source_base": job.get("source_base"), "source_finetuned": job.get("source_finetuned"),
            "encoding": options.get("encoding"), "shard_size": options.get("shard_size"),
            "content_address": summary.get("content_address"), "sources": summary.get("sources"),
            "totals": summary.get("totals"), "engine": summary.get("engine")}


DIFFS = Collection(KIND, "diffs", "diff", "extraction", _fields)


def resolve(store: JobStore, ref: str, tenant: str, field: str) -> str:
    """The artifact URI a reference names: a diff's id (the tenant's own, extracted, not deleted), or a URI that
    is no deleted diff's. Another tenant's id reads as one that does not exist."""
    if not DIFF_ID.fullmatch(ref):
        check_not_deleted(store, {field: ref})
        return ref
    raw = store.r.hgetall(store.job_key(ref))
    if not DIFFS.owns(raw, tenant):
        raise Refused("diff_not_found", f"no diff {ref}", field)
    if field_of(raw, "deleted_at"):
        raise Refused("diff_deleted", f"diff {ref} was deleted", field)
    status = field_of(raw, "status")
    if status != JobStatus.SUCCEEDED:
        raise Refused("diff_not_ready", f"diff {ref} is {status}: only an extraction that succeeded can be "
                      f"applied (GET /v1/jobs/{ref})", field)
    return field_of(raw, "output")


def check_not_deleted(store: JobStore, named: dict[str, str]) -> None:
    """Refuse (`diff_deleted`, naming the field) any of `named` (field -> artifact URI) that is a deleted diff's."""
    if not named:
        return
    fields = list(named)
    held = store.r.hmget(DIFFS.deleted_key(store), [normal_uri(named[f]) for f in fields])
    for field, diff_id in zip(fields, held, strict=True):
        if diff_id is not None:
            raise Refused("diff_deleted", f"{named[field]} is diff {diff_id.decode()}, which was deleted", field)


def artifacts(record: dict) -> dict[str, str]:
    """Field -> URI of every diff artifact a job reads: its recipe's, or (a kind that runs no recipe, such as a
    LoRA export) the record's own `diff`."""
    if not record.get("recipe"):
        return {"diff": record["diff"]} if record.get("diff") else {}
    return {f"diffs.{i}.diff": d["diff"] for i, d in enumerate(recipe_diffs(record)) if d.get("diff") is not None}
