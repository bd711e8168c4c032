"""Diffs as the service keeps them: a diff is the artifact a succeeded `diff_extract` job published, known by that
job's id; its record is the job's (worker/service/job_store.py) plus what deleting it writes.

Layout (beside the job records, under the same key prefix):
- `tenant:<t>:diffs`   sorted set of the tenant's live diffs (all score 0; ids sort by creation time): added in
                       the transaction that marks the extraction succeeded, removed when the diff is deleted
- `diffs:deleted`      hash: a deleted diff's artifact URI (normalised) -> its id; every job naming the artifact,
                       by id or by URI, is refused at submission and failed by the worker (`diff_deleted`)
- on the job's hash: `deleted_at` (shown) once it is deleted, `files_removed_at` (kept) once its files are gone

Deleting goes in this order, so that no job ever publishes from a partly removed artifact: the mark first (one
transaction: `deleted_at`, out of the list, the URI marked), then the files, the manifest first (from then on no
reader opens the rest as an artifact) and the shards and side files after it. A queued job sees the mark before it
resolves anything and fails `diff_deleted`; a running one that opened the artifact before the mark either reads
what it verified (a local file stays readable through its open descriptor) or fails on what is gone, and then
fails `diff_deleted` too; its output is never committed from missing bytes, and a retry meets the mark.
"""

from __future__ import annotations

import re

import orjson
import redis

from worker.engine.errors import GraftError
from worker.engine.storage.uris import parse_uri
from worker.service.job_store import JobStore, decode_job, now_iso
from worker.service.kinds.bodies import DIFF_ID_PATTERN
from worker.service.kinds.recipes import recipe_diffs
from worker.service.statuses import JobStatus

KIND = "diff_extract"
COLLECTION = "diffs"
DIFF_ID = re.compile(DIFF_ID_PATTERN)
REMOVED = "files_removed_at"  # kept on the job's hash, not shown by the job


class DiffRefused(GraftError):
    """A reference to a diff a request may not use (`diff_not_found`, `diff_deleted`, `diff_not_ready`), or a
    deletion refused (`not_found`, `diff_unfinished`); `field` names where the body named it."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message, {"field": field} if field else {})
        self.field = field


def collection_key(store: JobStore, tenant: str) -> str:
    return f"{store.p}tenant:{tenant}:{COLLECTION}"


def deleted_key(store: JobStore) -> str:
    return f"{store.p}diffs:deleted"


def normal_uri(uri: str) -> str:
    """The one spelling of an artifact's URI (file:///a//b/ and file:///a/b are one artifact)."""
    try:
        return str(parse_uri(uri, field="diff"))
    except GraftError:
        return uri


def collect(pipe: redis.client.Pipeline, store: JobStore, tenant: str | None, record: dict) -> None:
    """Queued in the transaction that marks an extraction succeeded: the diff is listed, and its location (a
    deleted diff's before, maybe) is no longer a deleted one's."""
    if tenant is not None:
        pipe.zadd(collection_key(store, tenant), {record["id"]: 0})
    pipe.hdel(deleted_key(store), normal_uri(record["output"]))


def _field(raw: dict, name: str):
    value = raw.get(name.encode())
    return orjson.loads(value) if value is not None else None


def _owned(raw: dict, tenant: str) -> bool:
    return bool(raw) and raw.get(b"tenant", b"").decode() == tenant and _field(raw, "kind") == KIND


def owned_raw(store: JobStore, diff_id: str, tenant: str) -> dict | None:
    """The diff's job hash when it is one of the tenant's diffs (any status), else None."""
    raw = store.r.hgetall(store.job_key(diff_id))
    return raw if _owned(raw, tenant) else None


def resolve(store: JobStore, ref: str, tenant: str, field: str) -> str:
    """The artifact URI a reference names: a diff's id (the tenant's own, extracted, not deleted), or a URI that
    is no deleted diff's. Another tenant's id reads as one that does not exist."""
    if not DIFF_ID.fullmatch(ref):
        check_not_deleted(store, {field: ref})
        return ref
    raw = store.r.hgetall(store.job_key(ref))
    if not _owned(raw, tenant):
        raise DiffRefused("diff_not_found", f"no diff {ref}", field)
    if _field(raw, "deleted_at"):
        raise DiffRefused("diff_deleted", f"diff {ref} was deleted", field)
    status = _field(raw, "status")
    if status != JobStatus.SUCCEEDED:
        raise DiffRefused("diff_not_ready", f"diff {ref} is {status}: only an extraction that succeeded can be "
                          f"applied (GET /v1/jobs/{ref})", field)
    return _field(raw, "output")


def check_not_deleted(store: JobStore, named: dict[str, str]) -> None:
    """Refuse (`diff_deleted`, naming the field) any of `named` (field -> artifact URI) that is a deleted diff's."""
    if not named:
        return
    fields = list(named)
    held = store.r.hmget(deleted_key(store), [normal_uri(named[f]) for f in fields])
    for field, diff_id in zip(fields, held, strict=True):
        if diff_id is not None:
            raise DiffRefused("diff_deleted", f"{named[field]} is diff {diff_id.decode()}, which was deleted", field)


def artifacts(record: dict) -> dict[str, str]:
    """Field -> URI of every diff artifact a job's recipe reads."""
    return {f"diffs.{i}.diff": d["diff"] for i, d in enumerate(recipe_diffs(record)) if d.get("diff") is not None}


def view(raw: dict) -> dict:
    """A diff as GET /v1/diffs/{id} shows it, from its extraction job's hash: the extraction's status (or
    deleting / deleted), where the artifact is, its provenance, encoding, sizes and reconstruction errors."""
    job = decode_job(raw)
    result = job.get("result") or {}
    summary = result.get("diff") or {}
    options = job.get("options") or {}
    status = job["status"]
    if job.get("deleted_at"):
        status = "deleted" if _field(raw, REMOVED) else "deleting"
    return {"id": job["id"], "object": "graft.diff", "status": status, "job": f"/v1/jobs/{job['id']}",
            "created_at": job["created_at"], "finished_at": job.get("finished_at"),
            "deleted_at": job.get("deleted_at"), "source_base": job.get("source_base"),
            "source_finetuned": job.get("source_finetuned"), "uri": job["output"],
            "manifest_uri": result.get("manifest_uri"), "encoding": options.get("encoding"),
            "shard_size": options.get("shard_size"), "content_address": summary.get("content_address"),
            "sources": summary.get("sources"), "totals": summary.get("totals"), "engine": summary.get("engine"),
            "files": result.get("files"), "stats": result.get("stats"), "progress": job.get("progress"),
            "error": job.get("error"), "metadata": job.get("metadata") or {}}


def list_ids(store: JobStore, tenant: str, after: str | None, count: int) -> list[str]:
    """The tenant's live diffs, newest first, strictly older than `after`."""
    upper = f"({after}" if after else "+"
    return [i.decode() for i in store.r.zrevrangebylex(collection_key(store, tenant), upper, "-", start=0, num=count)]


def mark_deleted(store: JobStore, diff_id: str, tenant: str) -> dict:
    """Deletion's first step, atomic: `deleted_at` set, the diff out of the tenant's list, its URI marked. Returns
    the job's hash as it is then; a diff already marked is returned as it is (its files' removal is resumed)."""
    key = store.job_key(diff_id)
    with store.r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.hgetall(key)
                if not _owned(raw, tenant):
                    pipe.unwatch()
                    raise DiffRefused("not_found", f"no diff {diff_id}")
                if _field(raw, "deleted_at"):
                    pipe.unwatch()
                    return raw
                status = _field(raw, "status")
                if status != JobStatus.SUCCEEDED:
                    pipe.unwatch()
                    raise DiffRefused("diff_unfinished", f"diff {diff_id} is {status}: " + (
                        "nothing was published" if status in ("failed", "cancelled") else
                        f"cancel its extraction instead (POST /v1/jobs/{diff_id}/cancel)"))
                at = now_iso()
                pipe.multi()
                pipe.hset(key, "deleted_at", orjson.dumps(at))
                pipe.zrem(collection_key(store, tenant), diff_id)
                pipe.hset(deleted_key(store), normal_uri(_field(raw, "output")), diff_id)
                pipe.rpush(store.events_key(diff_id), orjson.dumps({"at": at, "type": "diff_deleted"}))
                pipe.execute()
                return {**raw, b"deleted_at": orjson.dumps(at)}
            except redis.WatchError:
                continue


def artifact_files(raw: dict) -> list[str]:
    """What removing the artifact deletes, in order: its manifest, then every file the extraction published."""
    result = _field(raw, "result") or {}
    manifest = (result.get("manifest_uri") or "").rsplit("/", 1)[-1]
    return [*([manifest] if manifest else []), *(f["path"] for f in result.get("files") or ())]


def mark_removed(store: JobStore, diff_id: str) -> dict:
    store.r.hset(store.job_key(diff_id), REMOVED, orjson.dumps(now_iso()))
    return store.r.hgetall(store.job_key(diff_id))
