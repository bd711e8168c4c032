"""Remote inputs read over several lanes, outputs uploaded over several parts: against moto's S3 server and the
local hub behind worker.devtools.tcp_proxy
with a per-connection byte-rate cap (what real object stores do), with resets,
stalls and 5xx thrown in. Every graft must equal the local one byte for byte."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from urllib.parse import urlparse

import pytest
from conftest import upload_dir
from graft_helpers import graft, multipart_trio
from hub_server import HubServer

from worker.devtools.tcp_proxy import FaultProxy
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.lanes import Lanes, RemoteReads
from worker.engine.storage.s3 import s3_client
from worker.engine.storage.sinks import MANIFEST, open_sink
from worker.engine.storage.stores import S3Store, open_store
from worker.engine.storage.uris import parse_uri

SKIP = {MANIFEST, "README.md"}  # these name the input URIs
MB = 1_000_000
# Small windows and blocks: many of each even in these small models.
SMALL = {"block_bytes": 512 << 10, "prefetch_blocks": 1, "remote_window_bytes": 256 << 10, "remote_lanes": 4,
         "s3_part_bytes": 8 << 20, "s3_parts_in_flight": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return multipart_trio(str(tmp_path_factory.mktemp("lanes")))


@pytest.fixture(scope="module")
def expected(models, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("expected") / "out")
    graft(models, out, settings_overrides=SMALL)
    return out


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(("127.0.0.1", urlparse(s3_endpoint).port)) as p:
        p.set_latency(0.02)  # what a new connection costs
        yield p


@pytest.fixture
def s3_models(models, s3_endpoint, s3_bucket):
    return {role: upload_dir(s3_endpoint, path, s3_bucket, f"in/{role}") for role, path in models.items()}


@pytest.fixture
def storage_log(caplog):
    caplog.set_level(logging.WARNING, logger="graft.storage")
    return caplog


def _same(expected_dir: str, fetch) -> None:
    names = sorted(set(os.listdir(expected_dir)) - SKIP)
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        with open(os.path.join(expected_dir, name), "rb") as fh:
            assert fetch(name) == fh.read(), name


def _s3_fetch(endpoint: str, uri: str):
    loc = parse_uri(uri)
    client = s3_client(endpoint)
    return lambda name: client.get_object(Bucket=loc.bucket, Key=f"{loc.prefix}/{name}")["Body"].read()


class _Calls:
    """Observes one S3 operation on the engine's (shared) boto3 client: its parameters, and how many calls
    were in flight at once (from the call until its answer's headers)."""

    def __init__(self, client, operation: str) -> None:
        self.client, self.operation = client, operation
        self.params: list[dict] = []
        self.in_flight = self.peak = 0
        self._lock = threading.Lock()

    def _before(self, params, **kwargs) -> None:
        with self._lock:
            self.params.append(dict(params))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _after(self, **kwargs) -> None:
        with self._lock:
            self.in_flight -= 1

    def __enter__(self) -> _Calls:
        self.client.meta.events.register(f"provide-client-params.s3.{self.operation}", self._before)
        self.client.meta.events.register(f"after-call.s3.{self.operation}", self._after)
        return self

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister(f"provide-client-params.s3.{self.operation}", self._before)
        self.client.meta.events.unregister(f"after-call.s3.{self.operation}", self._after)


def _read_all(store, name: str, chunk: int) -> bytes:
    size = store.size(name)
    reads = [(name, start, min(chunk, size - start)) for start in range(0, size, chunk)]
    store.expect(reads)
    out = bytearray(size)
    for _, start, length in reads:
        store.stream_into(name, start, memoryview(out)[start:start + length])
    return bytes(out)


def test_lanes_read_one_input_over_several_pooled_connections(models, s3_models, proxy):
    """At a capped rate per connection, 4 lanes read an input about 4 times as fast as one, each lane on a
    connection kept open from one ranged GET to the next."""
    name = "model.safetensors"
    with open(os.path.join(models["source_base"], name), "rb") as fh:
        want = fh.read()
    proxy.set_rate(down=8 * MB)
    seconds = {}
    for lanes in (1, 4):
        # moto reads the whole object for each ranged GET and closes each connection: spans keep requests few
        reads = RemoteReads(lanes=lanes, window_bytes=512 << 10, span_windows=8)
        store = open_store(parse_uri(s3_models["source_base"]), proxy.endpoint, reads=reads)
        try:
            assert name in store.files  # the listing, outside the timing
            accepted = proxy.accepted
            t0 = time.monotonic()
            assert _read_all(store, name, 1 << 20) == want
            seconds[lanes] = time.monotonic() - t0
            stats = store.lanes
            assert stats.peak_lanes == lanes
            assert stats.peak_windows <= reads.held + 1  # what it holds, plus the one a reader waits for
            assert stats.fetched_bytes == len(want)  # every byte fetched once
            # one request per window (or run of windows); moto closes each connection after its answer, so
            # reuse is tested against the hub (below)
            assert stats.requests >= len(want) // (512 << 10) // 2
            assert proxy.accepted - accepted == stats.requests
        finally:
            store.close()
    # ideally 4x; moto's one interpreter on a loaded machine takes some of it, serialized lanes would be 1x
    assert seconds[4] < seconds[1] / 1.5, seconds


def test_read_ahead_follows_any_walk_and_holds_bounded_memory():
    """Tensors saved in another order than they are read: the file is walked back to front, each tensor
    front to back. Read-ahead follows the announced order exactly: nothing is fetched twice and at most
    `held` windows (plus one per waiting reader) are held."""
    data = os.urandom(3 << 20)
    width = 64 << 10
    tensors = [(start, min(300_000, len(data) - start)) for start in range(0, len(data), 300_000)][::-1]
    reads = [("f", start + off, min(100_000, length - off)) for start, length in tensors
             for off in range(0, length, 100_000)]
    fetches: list[tuple[int, int]] = []

    def fetch(name: str, start: int, end: int, take) -> None:
        fetches.append((start, end))
        for pos in range(start, end, 10_000):  # in pieces, as a response arrives
            take(memoryview(data)[pos:min(end, pos + 10_000)])

    closing = threading.Event()
    # 12 windows: a window two tensors share stays held from the one's first read to the other's last
    # (five windows apart); fewer, and dropping it for the nearer ones is the better choice.
    lanes = Lanes(RemoteReads(lanes=3, window_bytes=width, windows=12, span_windows=2), lambda name: len(data),
                  fetch, closing)
    try:
        lanes.expect(reads)
        out = bytearray(len(data))
        for name, start, length in reads:
            lanes.read(name, start, memoryview(out)[start:start + length])
        assert bytes(out) == data
        assert lanes.fetched_bytes == len(data)
        assert sum(end - start for start, end in fetches) == len(data)
        assert lanes.peak_windows <= lanes.cap + 1
        assert lanes.peak_lanes == 3
    finally:
        lanes.close()


def test_s3_graft_through_lanes_matches_local_and_reads_side_files_first(models, expected, s3_models, s3_endpoint,
                                                                         s3_bucket, proxy):
    proxy.set_rate(down=10 * MB, up=10 * MB)
    reading, writing = S3Store.client_for(proxy.endpoint), s3_client(proxy.endpoint)  # the stores', the sink's
    reads_at_first_block: list[int] = []

    def first_block() -> bool:
        if not reads_at_first_block:
            reads_at_first_block.append(len(gets.params))
        return False

    out = f"s3://{s3_bucket}/out/lanes"
    with _Calls(reading, "GetObject") as gets, _Calls(writing, "UploadPart") as parts:
        result, _ = graft(s3_models, out, should_cancel=first_block,
                          settings_overrides={**SMALL, "s3_endpoint_url": proxy.endpoint})
    _same(expected, _s3_fetch(s3_endpoint, out))
    keys = [p["Key"].rsplit("/", 1)[1] for p in gets.params]
    small = [i for i, k in enumerate(keys) if not k.endswith(".safetensors")]
    assert small and max(small) < reads_at_first_block[0], "a side file was read after the stream started"
    assert gets.peak >= 4, "the ranged GETs never overlapped"
    assert len(parts.params) >= 2 and parts.peak >= 2, "the output's parts never overlapped"
    manifest = json.loads(_s3_fetch(s3_endpoint, out)(MANIFEST))
    assert {f["path"] for f in manifest["output"]["files"]} >= {"config.json", "model.safetensors", "README.md"}
    assert result.stats["bytes_read"] > 0


def test_a_reset_lane_resumes_its_own_range(models, expected, s3_models, proxy, tmp_path, storage_log):
    """Connections reset mid-response: each lane reopens its range where its bytes stopped (a Range past
    the first byte it had asked for), not from its start."""
    proxy.set_rate(down=4 * MB)
    blocks = 0

    def hook() -> bool:
        nonlocal blocks
        blocks += 1
        # moto closes a connection after each answer: one open through the proxy is a response in flight
        if blocks >= 3 and blocks < 1000 and proxy.open_connections:
            blocks = 1000
            proxy.reset()  # every open connection reset, new ones too, for a moment
            threading.Timer(0.3, proxy.passthrough).start()
        return False

    width = 1 << 20  # four pieces of a response each: a reset one has delivered some
    with _Calls(S3Store.client_for(proxy.endpoint, StorageRetry(timeout=20.0)), "GetObject") as gets:
        # spans of windows: long responses, so that the reset finds some half-way
        graft(s3_models, tmp_path / "out", should_cancel=hook,
              settings_overrides={**SMALL, "s3_endpoint_url": proxy.endpoint, "remote_lanes": 2,
                                  "remote_window_bytes": width, "remote_span_windows": 8,
                                  "storage_timeout_seconds": 20.0,
                                  "storage_retry_seconds": 20})
    _same(expected, lambda name: (tmp_path / "out" / name).read_bytes())
    starts = {int(p["Range"].split("=")[1].split("-")[0]) for p in gets.params
              if p["Key"].endswith(".safetensors") and p.get("Range")}
    resumed = [re.search(r"reading bytes (\d+)-\d+: .* reopening from byte (\d+)", r.getMessage())
               for r in storage_log.records]
    resumed = [(int(m.group(1)), int(m.group(2))) for m in resumed if m]
    assert resumed, [r.getMessage() for r in storage_log.records]
    for first, at in resumed:  # reopened past the range's first byte, and asked for from there
        assert first < at and at in starts, (first, at)


def test_a_stalled_lane_is_reissued(models, expected, s3_models, proxy, tmp_path, storage_log):
    """The connections open at some point stop forwarding (new ones work): a lane that receives nothing
    for GRAFT_REMOTE_STALL_SECONDS gives up on its connection and asks again on another, from where its
    bytes stopped, long before the storage timeout."""
    proxy.set_rate(down=4 * MB)
    blocks = 0

    def hook() -> bool:
        nonlocal blocks
        blocks += 1
        if 3 <= blocks < 1000 and proxy.open_connections:  # (moto: an open connection is an answer in flight)
            blocks = 1000
            proxy.stall_open()
        return False

    t0 = time.monotonic()
    graft(s3_models, tmp_path / "out", should_cancel=hook,
          settings_overrides={**SMALL, "s3_endpoint_url": proxy.endpoint, "remote_window_bytes": 1 << 20,
                              "remote_stall_seconds": 0.3, "storage_timeout_seconds": 30.0,
                              "storage_retry_seconds": 20})
    elapsed = time.monotonic() - t0
    proxy.passthrough()
    assert blocks >= 1000, "no answer was in flight when the stream ran"
    _same(expected, lambda name: (tmp_path / "out" / name).read_bytes())
    messages = [r.getMessage() for r in storage_log.records]
    assert any("reopening from byte" in m and "timeout" in m.lower() for m in messages), messages
    assert elapsed < 15, elapsed  # the storage timeout (30 s) would have been waited out otherwise


def test_upload_parts_in_flight_and_small_tail_parts(s3_endpoint, s3_bucket, proxy):
    """Parts in flight is a setting; the last eight part_bytes of a file go out as 5 MiB parts side by side."""
    proxy.set_rate(up=20 * MB)
    data = os.urandom(72 << 20)
    with _Calls(s3_client(proxy.endpoint), "UploadPart") as parts:
        sink = open_sink(parse_uri(f"s3://{s3_bucket}/parts"), endpoint_url=proxy.endpoint, part_bytes=8 << 20,
                         parts_in_flight=3)
        writer = sink.open("big.bin", len(data))
        for i in range(0, len(data), 1 << 20):
            writer.write(data[i:i + (1 << 20)])
        writer.close()
        sink.commit(b"{}")
    sizes = [len(p["Body"]) >> 20 for p in sorted(parts.params, key=lambda p: p["PartNumber"])]
    assert sizes == [8] + [5] * 12 + [4]
    assert 2 <= parts.peak <= 5  # at most 3 x 8 MiB in flight: four 5 MiB tail parts and the last 4 MiB fit
    assert _s3_fetch(s3_endpoint, f"s3://{s3_bucket}/parts")("big.bin") == data


def test_hf_lanes_follow_the_redirect_once_per_file_and_retry_5xx(models, expected, tmp_path, monkeypatch,
                                                                  storage_log):
    """hf:// through the same lanes: the hub's resolve/ answers redirect to where the bytes are; each file's
    redirect is followed once, every ranged read after goes to its final location; 503s are retried."""
    hub = HubServer(redirect=True)
    for role, path in models.items():
        hub.add(f"graft-test/{role.replace('_', '-')}", path)
    hub.start()
    try:
        with FaultProxy(("127.0.0.1", urlparse(hub.endpoint).port)) as proxy:
            proxy.set_rate(down=10 * MB)
            proxy.set_latency(0.02)
            monkeypatch.setenv("HF_ENDPOINT", proxy.endpoint)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            hub.fail(3, 503)  # the first file requests: the servers are busy
            uris = {role: f"hf://graft-test/{role.replace('_', '-')}" for role in models}
            graft(uris, tmp_path / "out", settings_overrides={**SMALL, "storage_retry_seconds": 20})
            connections = proxy.accepted
    finally:
        hub.stop()
    _same(expected, lambda name: (tmp_path / "out" / name).read_bytes())
    requests = hub.file_requests()
    assert sum(r["status"] == 503 for r in requests) == 3
    redirects: dict[tuple[str, str], int] = {}
    for r in requests:
        if r["route"] == "resolve" and r["status"] == 302:
            redirects[(r["repo"], r["file"])] = redirects.get((r["repo"], r["file"]), 0) + 1
    assert redirects and set(redirects.values()) == {1}, redirects
    ranged = [r for r in requests if r["file"].endswith(".safetensors") and r["status"] == 206]
    assert len(ranged) > 3 * len(models) and all(r["route"] == "cdn" for r in ranged)
    # this server keeps connections open: the lanes' are reused from one ranged GET to the next
    assert connections <= 3 * (SMALL["remote_lanes"] + 4) < len(requests), (connections, len(requests))
    assert any("503" in r.getMessage() for r in storage_log.records)


def test_dry_run_states_the_memory_remote_io_holds(s3_models, capsys):
    from worker.cli import main
    from worker.engine import GraftRequest, plan_graft
    from worker.service.settings import Settings

    settings = Settings(remote_lanes=6, remote_window_bytes=4 << 20, s3_part_bytes=8 << 20, s3_parts_in_flight=5)
    request = GraftRequest.single(s3_models["source_base"], s3_models["source_finetuned"], s3_models["target_base"], "")
    plan, models = plan_graft(request, settings)
    try:
        memory = plan.to_dict()["memory"]
    finally:
        for m in models.values():
            m.store.close()
    assert memory["remote_inputs"]["target_base"] == {"lanes": 6, "window_bytes": 4 << 20, "windows": 7,
                                                      "bytes": 7 * (4 << 20)}
    assert memory["remote_input_bytes"] == 3 * 7 * (4 << 20)
    assert memory["s3_output_bytes"] == 6 * (8 << 20)
    args = ["run", "--source-base", s3_models["source_base"], "--source-finetuned", s3_models["source_finetuned"],
            "--target-base", s3_models["target_base"], "--dry-run"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["remote_inputs"].keys() == set(s3_models)
    assert main(args) == 0
    assert "remote reads hold at most" in capsys.readouterr().out
