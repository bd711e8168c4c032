"""The per-tenant status index of JobStore, against a real Redis: listing by status pages through the index
in id order across transitions, stays consistent under racing transitions, caps unfinished jobs atomically,
and is backfilled for records written before it existed."""

from __future__ import annotations

import threading
import uuid

import orjson
import pytest
import redis

from worker.service.job_store import STATUSES, UNFINISHED, JobStore, new_job_id


@pytest.fixture
def store(redis_url):
    conn = redis.Redis.from_url(redis_url)
    s = JobStore(conn, f"test-index-{uuid.uuid4().hex[:10]}:")
    try:
        yield s
    finally:
        keys = list(conn.scan_iter(match=f"{s.p}*", count=1000))
        if keys:
            conn.delete(*keys)
        conn.close()


def _doc(job_id: str, status: str = "queued") -> dict:
    return {"id": job_id, "object": "graft.job", "status": status, "created_at": "2025-01-01T00:00:00.000Z",
            "webhook_url": None}


def _ids(n: int) -> list[str]:
    return sorted(new_job_id() for _ in range(n))


def _pages(store: JobStore, tenant: str, status: str | None, size: int) -> list[str]:
    out, after = [], None
    while True:
        page = store.list_ids(tenant, after, size, status=status)
        out += page
        if len(page) < size:
            return out
        after = page[-1]


def _indexed(store: JobStore, tenant: str) -> dict[str, set[str]]:
    return {s: {i.decode() for i in store.r.zrange(store.tenant_status_key(tenant, s), 0, -1)} for s in STATUSES}


def test_listing_by_status_pages_in_order_across_transitions(store):
    ids = _ids(23)
    for job_id in ids:
        assert store.create(_doc(job_id), "alpha")
    store.create(_doc(new_job_id()), "beta")
    running, done = ids[::3], ids[::6]
    for job_id in running:
        assert store.transition(job_id, ("queued",), "running") == "queued"
    for job_id in done:
        assert store.transition(job_id, ("running",), "succeeded") == "running"
    expected = {"queued": [i for i in ids if i not in running], "running": [i for i in running if i not in done],
                "succeeded": done}
    for status, members in expected.items():
        for size in (1, 4, 100):
            assert _pages(store, "alpha", status, size) == members[::-1], (status, size)
    assert _pages(store, "alpha", None, 5) == ids[::-1]
    assert store.list_ids("alpha", None, 10, status="failed") == []
    assert store.tenant_status_counts("alpha") == {s: len(expected.get(s, ())) for s in STATUSES}
    assert store.active_count("alpha") == len(ids) - len(done)
    assert store.active_count("beta") == 1 and store.active_count("nobody") == 0
    assert store.transition(done[0], ("queued",), "failed") is None  # refused: nothing moves
    assert store.list_ids("alpha", None, 100, status="failed") == []


def _race(url: str, prefix: str, job_id: str, barrier: threading.Barrier, moves: list) -> None:
    mine = JobStore(redis.Redis.from_url(url), prefix)  # a connection per racer, as processes would have
    try:
        barrier.wait()
        for allowed, to in moves:
            mine.transition(job_id, allowed, to)
    finally:
        mine.r.close()


def test_index_stays_consistent_under_racing_transitions(store, redis_url):
    """A worker walking each job to success races a cancel and a recovery that fails it: whichever wins,
    every job ends in exactly the set of the status its record holds."""
    ids = _ids(12)
    for job_id in ids:
        store.create(_doc(job_id), "alpha")
    walks = [[(("queued",), "validating"), (("validating",), "running"), (("running",), "succeeded")],
             [(("queued", "validating", "running"), "cancelling"), (("cancelling",), "cancelled")],
             [(("validating", "running"), "failed"), (("queued",), "failed")]]
    barrier = threading.Barrier(len(ids) * len(walks))
    threads = [threading.Thread(target=_race, args=(redis_url, store.p, job_id, barrier, walk))
               for job_id in ids for walk in walks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    indexed = _indexed(store, "alpha")
    for job_id in ids:
        status = store.status(job_id)
        assert [s for s in STATUSES if job_id in indexed[s]] == [status], job_id
        assert store.r.sismember(store.status_key(status), job_id)
    assert sum(len(v) for v in indexed.values()) == len(ids)


def test_create_caps_unfinished_jobs_atomically(store, redis_url):
    created, barrier = [], threading.Barrier(6)

    def submit() -> None:
        mine = JobStore(redis.Redis.from_url(redis_url), store.p)
        try:
            barrier.wait()
            for _ in range(5):
                job_id = new_job_id()
                if mine.create(_doc(job_id), "alpha", max_unfinished=7):
                    created.append(job_id)
        finally:
            mine.r.close()

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(created) == 7 and store.active_count("alpha") == 7
    assert not store.create(_doc(new_job_id()), "alpha", max_unfinished=7)
    store.transition(created[0], ("queued",), "cancelled")
    assert store.create(_doc(new_job_id()), "alpha", max_unfinished=7)


def _create_the_old_way(store: JobStore, job_id: str, tenant: str, status: str) -> None:
    """What create() wrote before the per-tenant status sets existed."""
    with store.r.pipeline() as pipe:
        pipe.hset(store.job_key(job_id), mapping={**{k: orjson.dumps(v) for k, v in _doc(job_id, status).items()},
                                                  "tenant": tenant})
        pipe.zadd(store.tenant_key(tenant), {job_id: 0})
        pipe.sadd(store.status_key(status), job_id)
        pipe.execute()


def test_backfill_indexes_old_records_once(store):
    ids = _ids(1203)
    statuses = {job_id: STATUSES[n % len(STATUSES)] for n, job_id in enumerate(ids)}
    tenants = {job_id: ("alpha", "beta", "gamma:x")[n % 3] for n, job_id in enumerate(ids)}
    for job_id in ids:
        _create_the_old_way(store, job_id, tenants[job_id], statuses[job_id])
    newer = new_job_id()
    store.create(_doc(newer), "alpha")  # written by the new code before the backfill ran
    assert store.active_count("alpha") == 1
    assert store.backfill_status_index(batch=100) == len(ids) + 1
    assert store.backfill_status_index() == 0, "the version key did not stop a second pass"
    for tenant in ("alpha", "beta", "gamma:x"):
        mine = [i for i in ids if tenants[i] == tenant] + ([newer] if tenant == "alpha" else [])
        for status in STATUSES:
            want = sorted((i for i in mine if statuses.get(i, "queued") == status), reverse=True)
            assert _pages(store, tenant, status, 50) == want, (tenant, status)
        assert store.active_count(tenant) == sum(1 for i in mine if statuses.get(i, "queued") in UNFINISHED)
    # a stale entry (an old writer moved the job after the backfill) is repaired by a forced pass
    stale = ids[0]
    store.r.zadd(store.tenant_status_key(tenants[stale], "running"), {stale: 0})
    assert store.backfill_status_index(force=True) == len(ids) + 1
    assert [s for s in STATUSES if stale in _indexed(store, tenants[stale])[s]] == [statuses[stale]]
