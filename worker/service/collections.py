"""A kind's collection: what the succeeded jobs of one kind (a diff extraction, a LoRA export) are once they have
published, a tenant-owned record known by its job's id, listed, read and deleted (GET /v1/<name>, GET and DELETE
/v1/<name>/{id}; the routes are app/routes_collections.py's). The record is the job's (worker/service/job_store.py)
plus what deleting it writes; each collection adds only how it shows its job's result (`Collection.fields`).

Layout (beside the job records, under the same key prefix):
- `tenant:<t>:<name>`  sorted set of the tenant's live records (all score 0; ids sort by creation time): added in
                       the transaction that marks the job succeeded, removed when the record is deleted
- `<name>:deleted`     hash: a deleted record's output URI (normalised) -> its id; what reads the collection's
                       artifacts as inputs (graft jobs reading diffs: worker/service/diffs.py) refuses them
- on the job's hash: `deleted_at` (shown) once it is deleted, `files_removed_at` (kept) once its files are gone

Deleting goes in this order, so that nothing is ever seen half-way: the mark first (one transaction:
`deleted_at`, out of the list, the URI marked), then the files, the manifest first (from then on no reader opens
the rest as an artifact) and the files it lists after it. A DELETE that fails while removing files leaves the
record `deleting`; the same DELETE again finishes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson
import redis

from worker.engine.errors import GraftError
from worker.engine.storage.uris import parse_uri
from worker.service.job_store import JobStore, decode_job, now_iso
from worker.service.statuses import JobStatus

REMOVED = "files_removed_at"  # kept on the job's hash, not shown by the job


class Refused(GraftError):
    """A reference to a record a request may not use (`diff_not_found`, ...), or a deletion refused (`not_found`,
    `<noun>_unfinished`); `field` names where the body named it."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message, {"field": field} if field else {})
        self.field = field


def normal_uri(uri: str) -> str:
    """The one spelling of an artifact's URI (file:///a//b/ and file:///a/b are one artifact)."""
    try:
        return str(parse_uri(uri, field="uri"))
    except GraftError:
        return uri


def field_of(raw: dict, name: str):
    value = raw.get(name.encode())
    return orjson.loads(value) if value is not None else None


@dataclass(frozen=True)
class Collection:
    """The succeeded jobs of `kind`, as records `object` named `noun` (their job is an `action`: "extraction")
    under /v1/`name`; `fields(job)` is what a record shows beyond what every collection's record shows."""

    kind: str
    name: str
    noun: str
    action: str
    fields: Callable[[dict], dict]

    @property
    def object(self) -> str:
        return f"graft.{self.noun}"

    def key(self, store: JobStore, tenant: str) -> str:
        return f"{store.p}tenant:{tenant}:{self.name}"

    def deleted_key(self, store: JobStore) -> str:
        return f"{store.p}{self.name}:deleted"

    def collect(self, pipe: redis.client.Pipeline, store: JobStore, tenant: str | None, record: dict) -> None:
        """Queued in the transaction that marks the job succeeded: the record is listed, and its location (a
        deleted record's before, maybe) is no longer a deleted one's."""
        if tenant is not None:
            pipe.zadd(self.key(store, tenant), {record["id"]: 0})
        pipe.hdel(self.deleted_key(store), normal_uri(record["output"]))

    def owns(self, raw: dict, tenant: str) -> bool:
        return bool(raw) and raw.get(b"tenant", b"").decode() == tenant and field_of(raw, "kind") == self.kind

    def owned_raw(self, store: JobStore, record_id: str, tenant: str) -> dict | None:
        """The record's job hash when it is one of the tenant's (any status), else None."""
        raw = store.r.hgetall(store.job_key(record_id))
        return raw if self.owns(raw, tenant) else None

    def list_ids(self, store: JobStore, tenant: str, after: str | None, count: int) -> list[str]:
        """The tenant's live records, newest first, strictly older than `after`."""
        upper = f"({after}" if after else "+"
        return [i.decode() for i in store.r.zrevrangebylex(self.key(store, tenant), upper, "-", start=0, num=count)]

    def view(self, raw: dict) -> dict:
        """A record as GET /v1/<name>/{id} shows it, from its job's hash: the job's status (or deleting /
        deleted), where its output is, its files and stats, then the collection's own fields."""
        job = decode_job(raw)
        result = job.get("result") or {}
        status = job["status"]
        if job.get("deleted_at"):
            status = "deleted" if field_of(raw, REMOVED) else "deleting"
        return {"id": job["id"], "object": self.object, "status": status, "job": f"/v1/jobs/{job['id']}",
                "created_at": job["created_at"], "finished_at": job.get("finished_at"),
                "deleted_at": job.get("deleted_at"), "uri": job["output"], "manifest_uri": result.get("manifest_uri"),
                **self.fields(job), "files": result.get("files"), "stats": result.get("stats"),
                "progress": job.get("progress"), "error": job.get("error"), "metadata": job.get("metadata") or {}}

    def mark_deleted(self, store: JobStore, record_id: str, tenant: str) -> dict:
        """Deletion's first step, atomic: `deleted_at` set, the record out of the tenant's list, its URI marked.
        Returns the job's hash as it is then; a record already marked is returned as it is (its files' removal is
        resumed)."""
        key = store.job_key(record_id)
        with store.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not self.owns(raw, tenant):
                        pipe.unwatch()
                        raise Refused("not_found", f"no {self.noun} {record_id}")
                    if field_of(raw, "deleted_at"):
                        pipe.unwatch()
                        return raw
                    status = field_of(raw, "status")
                    if status != JobStatus.SUCCEEDED:
                        pipe.unwatch()
                        raise Refused(f"{self.noun}_unfinished", f"{self.noun} {record_id} is {status}: " + (
                            "nothing was published" if status in ("failed", "cancelled") else
                            f"cancel its {self.action} instead (POST /v1/jobs/{record_id}/cancel)"))
                    at = now_iso()
                    pipe.multi()
                    pipe.hset(key, "deleted_at", orjson.dumps(at))
                    pipe.zrem(self.key(store, tenant), record_id)
                    pipe.hset(self.deleted_key(store), normal_uri(field_of(raw, "output")), record_id)
                    pipe.rpush(store.events_key(record_id), orjson.dumps({"at": at, "type": f"{self.noun}_deleted"}))
                    pipe.execute()
                    return {**raw, b"deleted_at": orjson.dumps(at)}
                except redis.WatchError:
                    continue

    @staticmethod
    def files(raw: dict) -> list[str]:
        """What removing the output deletes, in order: its manifest, then every file the job published."""
        result = field_of(raw, "result") or {}
        manifest = (result.get("manifest_uri") or "").rsplit("/", 1)[-1]
        listed = [f["path"] for f in result.get("files") or () if f["path"] != manifest]
        return [*([manifest] if manifest else []), *listed]

    @staticmethod
    def mark_removed(store: JobStore, record_id: str) -> dict:
        store.r.hset(store.job_key(record_id), REMOVED, orjson.dumps(now_iso()))
        return store.r.hgetall(store.job_key(record_id))
