"""Storage faults, for real: moto's S3 server behind worker.devtools.tcp_proxy, which refuses, resets or stalls
connections while a graft runs. Short outages are ridden out inside an attempt; longer ones end in a clean
storage_error that leaves nothing behind; a job is retried after a delay by the service."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime
from urllib.parse import urlparse

import pytest
from conftest import upload_dir
from graft_helpers import graft, multipart_trio
from service_fixtures import Service, compare_dirs, local_graft, read_s3, wait_job

from worker.devtools.loopback import free_port
from worker.devtools.tcp_proxy import FaultProxy
from worker.engine import GraftError
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.sinks import MANIFEST, PENDING

# Small blocks and 8 MiB parts: the ~11 MB output is a multipart upload of two parts, streamed in many blocks.
STREAM = {"block_bytes": 512 << 10, "s3_part_bytes": 8 << 20, "prefetch_blocks": 1,
          "remote_window_bytes": 1 << 20, "remote_span_windows": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return multipart_trio(str(tmp_path_factory.mktemp("faults")))


@pytest.fixture(scope="module")
def expected(models, tmp_path_factory):
    """The uninterrupted local graft every faulty run must equal, byte for byte."""
    out = str(tmp_path_factory.mktemp("expected") / "out")
    graft(models, out, settings_overrides=STREAM)
    return out


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(("127.0.0.1", urlparse(s3_endpoint).port)) as p:
        yield p


@pytest.fixture
def s3_models(models, s3_endpoint, s3_bucket):
    return {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in models.items()}


@pytest.fixture
def storage_log(caplog):
    caplog.set_level(logging.WARNING, logger="graft.storage")
    return caplog


def _listing(endpoint: str, bucket: str, prefix: str) -> tuple[list[str], list[dict]]:
    """What is under the prefix, read from the emulator directly (not through the proxy)."""
    client = s3_client(endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/").get("Uploads", [])
    return keys, uploads


def _identical(expected_dir: str, endpoint: str, uri: str) -> None:
    got = read_s3(endpoint, uri)
    assert PENDING not in got and MANIFEST in got
    compare_dirs(expected_dir, got)


class _MidUpload:
    """The graft's between-blocks hook: once the output has a multipart upload in flight, runs `fault` (on
    a thread of its own, so the graft goes on meanwhile) and from then on only watches."""

    def __init__(self, endpoint: str, bucket: str, prefix: str, fault) -> None:
        self.client, self.bucket, self.prefix, self.fault = s3_client(endpoint), bucket, prefix, fault
        self.thread: threading.Thread | None = None

    def __call__(self) -> bool:
        if self.thread is None:
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "/")
            if uploads.get("Uploads"):
                self.thread = threading.Thread(target=self.fault, daemon=True)
                self.thread.start()
        return False

    def join(self) -> None:
        assert self.thread is not None, "the graft never had a multipart upload in flight"
        self.thread.join(30)


def _settings(proxy: FaultProxy, **extra) -> dict:
    return {**STREAM, "s3_endpoint_url": proxy.endpoint, "storage_timeout_seconds": 2.0, **extra}


def test_short_outage_mid_upload_is_ridden_out(models, expected, s3_models, s3_endpoint, s3_bucket, proxy,
                                              storage_log):
    def outage() -> None:
        proxy.refuse()  # new connections refused, open ones reset
        time.sleep(1.2)
        proxy.reset()  # connections accepted, then reset
        time.sleep(1.2)
        proxy.passthrough()

    hook = _MidUpload(s3_endpoint, s3_bucket, "out/short", outage)
    result, _ = graft(s3_models, f"s3://{s3_bucket}/out/short", should_cancel=hook,
                      settings_overrides=_settings(proxy, storage_retry_seconds=20))
    hook.join()
    assert result.manifest_uri == f"s3://{s3_bucket}/out/short/{MANIFEST}"
    _identical(expected, s3_endpoint, f"s3://{s3_bucket}/out/short")
    assert _listing(s3_endpoint, s3_bucket, "out/short")[1] == [], "no multipart upload left behind"
    assert any("retrying" in r.getMessage() for r in storage_log.records), "the outage was never met"


def test_outage_longer_than_the_budget_fails_cleanly(models, s3_models, s3_endpoint, s3_bucket, proxy, storage_log):
    """The first request to give up fails the graft; the storage is back half a second later, while the
    clean-up is still retrying: it removes every object and upload, the claim included."""
    back = threading.Event()

    class _BackSoonAfterGivingUp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "gave up" in record.getMessage() and not back.is_set():
                back.set()
                threading.Timer(0.5, proxy.passthrough).start()

    handler = _BackSoonAfterGivingUp()
    logging.getLogger("graft.storage").addHandler(handler)
    hook = _MidUpload(s3_endpoint, s3_bucket, "out/long", proxy.refuse)
    t0 = time.monotonic()
    try:
        with pytest.raises(GraftError) as info:
            graft(s3_models, f"s3://{s3_bucket}/out/long", should_cancel=hook,
                  settings_overrides=_settings(proxy, storage_retry_seconds=1.5))
    finally:
        logging.getLogger("graft.storage").removeHandler(handler)
    hook.join()
    assert info.value.code == "storage_error"
    assert "gave up" in info.value.message and f"s3://{s3_bucket}/" in info.value.message, info.value.message
    assert time.monotonic() - t0 < 30
    assert back.is_set()
    assert _listing(s3_endpoint, s3_bucket, "out/long") == ([], []), "objects or uploads left behind"


def test_storage_down_through_the_cleanup_is_cleared_by_the_jobs_retry(models, expected, s3_models, s3_endpoint,
                                                                       s3_bucket, proxy):
    """Down past the clean-up's budget too: the attempt's leftovers stay, under its claim, until the next
    attempt of the same job (same writer) clears them, then writes the same bytes."""
    out = f"s3://{s3_bucket}/out/down"
    hook = _MidUpload(s3_endpoint, s3_bucket, "out/down", proxy.refuse)
    with pytest.raises(GraftError) as info:
        graft(s3_models, out, should_cancel=hook, writer="job-1",
              settings_overrides=_settings(proxy, storage_retry_seconds=0.8))
    hook.join()
    assert info.value.code == "storage_error"
    proxy.passthrough()
    keys, _ = _listing(s3_endpoint, s3_bucket, "out/down")
    assert f"out/down/{MANIFEST}" not in keys and f"out/down/{PENDING}" in keys
    with pytest.raises(GraftError) as busy:  # another graft may not take over what job-1 claimed
        graft(s3_models, out, writer="job-2", settings_overrides=_settings(proxy))
    assert busy.value.code == "output_busy"
    graft(s3_models, out, writer="job-1", settings_overrides=_settings(proxy))
    _identical(expected, s3_endpoint, out)
    assert _listing(s3_endpoint, s3_bucket, "out/down")[1] == []


def test_stalled_connections_time_out_and_are_retried(models, expected, s3_models, s3_endpoint, s3_bucket, proxy,
                                                      storage_log):
    def stall() -> None:
        proxy.stall()  # connections accepted, nothing forwarded: only a read timeout notices
        time.sleep(2.0)
        proxy.passthrough()

    hook = _MidUpload(s3_endpoint, s3_bucket, "out/stall", stall)
    t0 = time.monotonic()
    graft(s3_models, f"s3://{s3_bucket}/out/stall", should_cancel=hook,
          settings_overrides=_settings(proxy, storage_timeout_seconds=0.5, storage_retry_seconds=20))
    hook.join()
    assert time.monotonic() - t0 < 30
    _identical(expected, s3_endpoint, f"s3://{s3_bucket}/out/stall")
    assert _listing(s3_endpoint, s3_bucket, "out/stall")[1] == []
    assert any("timeout" in r.getMessage().lower() for r in storage_log.records), [
        r.getMessage() for r in storage_log.records]


def test_unreachable_storage_at_resolve_time_is_a_storage_error(models, s3_models, s3_bucket, tmp_path, monkeypatch):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(GraftError) as info:
        graft(s3_models, tmp_path / "out", settings_overrides={"s3_endpoint_url": nobody,
                                                               "storage_retry_seconds": 0.5})
    assert info.value.code == "storage_error", info.value.to_dict()
    assert f"s3://{s3_bucket}/in/" in info.value.message and "listing" in info.value.message
    with pytest.raises(GraftError) as out_info:  # the output's storage unreachable, inputs local
        graft(models, f"s3://{s3_bucket}/out/x", settings_overrides={"s3_endpoint_url": nobody,
                                                                     "storage_retry_seconds": 0.5})
    assert out_info.value.code == "storage_error" and f"s3://{s3_bucket}/out/x" in out_info.value.message
    monkeypatch.setenv("HF_ENDPOINT", nobody)
    with pytest.raises(GraftError) as hub_info:
        graft({**models, "target_base": "hf://graft-test/target"}, tmp_path / "out",
              settings_overrides={"storage_retry_seconds": 0.5})
    assert hub_info.value.code == "storage_error" and "hf://graft-test/target" in hub_info.value.message
    assert time.monotonic() - t0 < 20
    assert not os.path.exists(tmp_path / "out")


def test_request_errors_keep_their_own_codes(models, s3_models, s3_endpoint, tmp_path):
    with pytest.raises(GraftError) as info:
        graft({**s3_models, "source_base": "s3://no-such-bucket-here/m"}, tmp_path / "out")
    assert info.value.code == "input_not_found" and "s3://no-such-bucket-here/m" in info.value.message
    with pytest.raises(GraftError) as out_info:
        graft(models, "s3://no-such-bucket-here/out")
    assert out_info.value.code == "output_not_found", out_info.value.to_dict()


def _wait_for(c, job_id: str, test, what: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = c.get(f"/v1/jobs/{job_id}").json()
        events = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
        if test(doc, events):
            return doc
        assert doc["status"] not in ("succeeded", "failed", "cancelled"), doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never {what}: {doc}")


def test_service_retries_a_job_after_a_delay_when_storage_is_down(redis_url, trio, s3_endpoint, s3_bucket, proxy,
                                                                  tmp_path):
    """The storage goes down mid-job for longer than the engine's retry budget: the attempt fails with
    storage_error, the job is queued again and only started after the backoff, and then succeeds."""
    expected = local_graft(trio, str(tmp_path / "expected"))
    uris = {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in trio.items()}
    out = f"s3://{s3_bucket}/out/job"
    # Slowed blocks (~1.5 s of streaming), so that the outage starts while the job runs.
    svc = Service(redis_url, str(tmp_path), s3_endpoint=proxy.endpoint, GRAFT_STORAGE_RETRY_SECONDS=0.5,
                  GRAFT_STORAGE_TIMEOUT_SECONDS=2, GRAFT_RETRY_BACKOFF=2, GRAFT_BLOCK_BYTES=4096,
                  GRAFT_JOB_BLOCK_DELAY=0.03)
    try:
        svc.start_api()
        svc.start_worker()
        with svc.client() as c:
            resp = c.post("/v1/jobs", json={**uris, "output": out})
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["id"]
            _wait_for(c, job_id, lambda d, e: d["status"] == "running" and (d["progress"] or {}).get(
                "bytes_written", 0) > 0, "ran")
            proxy.refuse()
            _wait_for(c, job_id, lambda d, e: any(x["type"] == "retry" for x in e), "was retried")
            proxy.passthrough()
            done = wait_job(c, job_id, timeout=60)
            assert done["status"] == "succeeded", done
            assert done["attempt"] == 2
            events = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
    finally:
        svc.stop()
    retry = next(e for e in events if e["type"] == "retry")
    assert retry["code"] == "storage_error" and retry["reason"].startswith("storage_error: "), retry
    assert f"s3://{s3_bucket}/" in retry["reason"] and retry["delay_seconds"] == 2, retry
    starts = [e for e in events if e["type"] == "started"]
    assert [e["attempt"] for e in starts] == [1, 2]
    # RQ's scheduler keeps whole seconds: a retry due in 2 s may start from 1 s on (at once without the delay).
    waited = (_at(starts[1]) - _at(retry)).total_seconds()
    assert waited >= 1.0, f"the retry started {waited:.2f}s after the failure: not delayed"
    _identical(expected, s3_endpoint, out)
    assert _listing(s3_endpoint, s3_bucket, "out/job")[1] == []


def _at(event: dict) -> datetime:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00"))


def test_hub_reads_ride_out_resets(trio, tmp_path, monkeypatch, storage_log):
    """hf:// inputs go through the same retries: resets in the middle of ranged reads are read again."""
    from hub_server import HubServer

    small = {"block_bytes": 16 << 10, "remote_window_bytes": 16 << 10, "remote_span_windows": 1,
             "storage_retry_seconds": 20}
    graft(trio, tmp_path / "local", settings_overrides=small)
    hub = HubServer()
    for role, path in trio.items():
        hub.add(f"graft-test/{role.replace('_', '-')}", path)
    hub.start()
    blocks = 0

    def outage() -> None:
        proxy.reset()
        time.sleep(1.0)
        proxy.passthrough()

    def hook() -> bool:
        nonlocal blocks
        blocks += 1
        if blocks == 3:
            threading.Thread(target=outage, daemon=True).start()
        return False

    try:
        with FaultProxy(("127.0.0.1", urlparse(hub.endpoint).port)) as proxy:
            monkeypatch.setenv("HF_ENDPOINT", proxy.endpoint)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            uris = {role: f"hf://graft-test/{role.replace('_', '-')}" for role in trio}
            graft(uris, tmp_path / "remote", should_cancel=hook, settings_overrides=small)
    finally:
        hub.stop()
    assert blocks > 3
    names = sorted(set(os.listdir(tmp_path / "local")) - {MANIFEST, "README.md"})
    for name in names:
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert any("retrying" in r.getMessage() for r in storage_log.records), "the resets were never met"


def test_classification_of_storage_failures():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from worker.engine.storage.faults import classify

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert classify(client_error("SlowDown", 503)) == ("storage_error", True)
    assert classify(client_error("InternalError", 500)) == ("storage_error", True)
    assert classify(client_error("RequestTimeout", 400)) == ("storage_error", True)
    assert classify(client_error("Whatever", 502)) == ("storage_error", True)
    assert classify(client_error("NoSuchKey", 404)) == ("input_not_found", False)
    assert classify(client_error("NoSuchBucket", 404), missing="output_not_found") == ("output_not_found", False)
    assert classify(client_error("AccessDenied", 403)) == ("storage_denied", False)
    assert classify(client_error("InvalidArgument", 400)) == ("storage_rejected", False)
    assert classify(client_error("NoSuchUpload", 404)) == ("storage_error", False)
    assert classify(EndpointConnectionError(endpoint_url="http://x")) == ("storage_error", True)
    assert classify(ReadTimeoutError(endpoint_url="http://x")) == ("storage_error", True)
    assert classify(ConnectionResetError()) == ("storage_error", True)
    assert classify(ValueError("a bug")) is None  # not the storage's: reported as an internal error


def test_proxy_stop_closes_its_sockets_and_threads(s3_endpoint):
    import socket

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    threads, before = threading.active_count(), fds()
    proxy = FaultProxy(("127.0.0.1", urlparse(s3_endpoint).port)).start()
    clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    for c in clients:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(12).startswith(b"HTTP/1.1")
    proxy.stop()
    for c in clients:  # the proxy's end is gone: reset or closed, never left hanging
        c.settimeout(5)  # a timeout here (socket.timeout) fails the test
        try:
            while c.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        c.close()
    assert threading.active_count() == threads
    assert fds() == before
    with pytest.raises(ValueError):
        FaultProxy(("192.0.2.1", 80))  # not loopback
