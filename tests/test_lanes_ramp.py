"""The lanes' cold-start ramp: windows split into sub-ranges fetched by several lanes at once, assembled into the
same bytes; readers served up to the first sub-range not in yet; a sub-range broken mid-way reopened from where
it stopped; the trace of a job's requests."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator

from worker.engine.storage import trace
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.lanes import MIN_PIECE, Lanes, RemoteReads
from worker.engine.storage.stores import RemoteStore
from worker.engine.storage.uris import Location

MiB = 1 << 20


def _reads(size: int, chunk: int) -> list[tuple[str, int, int]]:
    return [("f", s, min(chunk, size - s)) for s in range(0, size, chunk)]


def _read_all(lanes: Lanes, size: int, chunk: int) -> bytes:
    reads = _reads(size, chunk)
    lanes.expect(reads)
    out = bytearray(size)
    for name, start, length in reads:
        lanes.read(name, start, memoryview(out)[start:start + length])
    return bytes(out)


def test_cold_start_is_ramped_and_split_windows_assemble_the_same_bytes():
    """4 lanes, 4 MiB windows: the first requests are 1, 2, 3 and 4 MiB in reading order (windows 0 and 1 each
    filled by two requests at once), then whole windows; every byte fetched once, the bytes identical, for
    several read sizes (reads inside a window, across windows)."""
    data = os.urandom(21 * MiB + 12345)
    for chunk in (300_000, 4 * MiB, 7 * MiB + 1):
        fetches: list[tuple[int, int]] = []
        lock = threading.Lock()

        def fetch(name: str, start: int, end: int, take, fetches=fetches, lock=lock) -> None:
            with lock:
                fetches.append((start, end))
            for pos in range(start, end, 100_000):
                take(memoryview(data)[pos:min(end, pos + 100_000)])

        lanes = Lanes(RemoteReads(lanes=4, window_bytes=4 * MiB, span_windows=1), lambda n: len(data), fetch,
                      threading.Event())
        try:
            assert _read_all(lanes, len(data), chunk) == data
            assert lanes.fetched_bytes == len(data)
        finally:
            lanes.close()
        fetches.sort()
        assert fetches[:4] == [(0, MiB), (MiB, 3 * MiB), (3 * MiB, 6 * MiB), (6 * MiB, 10 * MiB)], fetches[:5]
        # No byte twice, none missed: the requests tile the file.
        assert all(a[1] == b[0] for a, b in zip(fetches, fetches[1:], strict=False)) and fetches[-1][1] == len(data)
        assert all(e - s <= 4 * MiB for s, e in fetches)


def test_the_end_is_ramped_down_so_the_lanes_finish_together():
    """Once less than a window per lane is left to fetch, each request takes at most a lane's share of what is
    left (at least a minimum piece): no lane starts a whole window while the others have nothing left."""
    data = os.urandom(32 * MiB + 5000)
    fetches: list[tuple[int, int]] = []
    lock = threading.Lock()

    def fetch(name: str, start: int, end: int, take) -> None:
        with lock:
            fetches.append((start, end))
        for pos in range(start, end, 256 << 10):
            time.sleep(0.0005)  # the lanes interleave as on a link
            take(memoryview(data)[pos:min(end, pos + (256 << 10))])

    lanes = Lanes(RemoteReads(lanes=4, window_bytes=4 * MiB), lambda n: len(data), fetch, threading.Event())
    try:
        assert _read_all(lanes, len(data), MiB) == data
        assert lanes.fetched_bytes == len(data)
    finally:
        lanes.close()
    fetches.sort()
    assert all(a[1] == b[0] for a, b in zip(fetches, fetches[1:], strict=False)) and fetches[-1][1] == len(data)
    # The reads walk the file in order, so what is left when a request is made is all from its start on.
    tail = [(s, e) for s, e in fetches if len(data) - s < 4 * 4 * MiB]
    assert tail and all(e - s <= max(MIN_PIECE, -(-(len(data) - s) // 4)) for s, e in tail), tail
    assert max(e - s for s, e in tail) < 4 * MiB


def test_a_reader_gets_a_windows_first_sub_range_while_the_next_is_held_back():
    """Window 0 of 4 MiB is fetched as [0, 1 MiB) and [1, 3 MiB) by two of four lanes: with the second held back, a
    read of the first MiB returns; a read reaching into the second waits for it, then gets the right bytes."""
    data = os.urandom(8 * MiB)
    release = threading.Event()

    def fetch(name: str, start: int, end: int, take) -> None:
        if start == MiB:
            assert release.wait(10)
        take(memoryview(data)[start:end])

    lanes = Lanes(RemoteReads(lanes=4, window_bytes=4 * MiB), lambda n: len(data), fetch, threading.Event())
    try:
        lanes.expect(_reads(len(data), MiB))
        out = bytearray(2 * MiB)
        lanes.read("f", 0, memoryview(out)[:MiB])
        assert out[:MiB] == data[:MiB]
        threading.Timer(0.2, release.set).start()
        lanes.read("f", MiB, memoryview(out)[MiB:])
        assert release.is_set() and out == data[:2 * MiB]
    finally:
        release.set()
        lanes.close()


class _Flaky(RemoteStore):
    """A remote store over bytes in memory whose responses break once each, half-way, for the ranges asked."""

    def __init__(self, data: bytes, reads: RemoteReads, break_at: set[int]) -> None:
        self.location = Location("s3", bucket="b", prefix="m")
        self.data, self.break_at = data, set(break_at)
        self.opened: list[tuple[int, int]] = []
        self._meta = {}
        self._init_remote(reads, StorageRetry(budget=5, timeout=5))

    def list_files(self) -> dict[str, int]:
        return {"f": len(self.data)}

    def _open(self, name: str, start: int, end: int) -> tuple[Iterator[bytes], Callable[[], None]]:
        self.opened.append((start, end))
        cut = start in self.break_at and self.break_at.remove(start) is None

        def chunks() -> Iterator[bytes]:
            half = start + (end - start) // 2
            for pos in range(start, end, 64 << 10):
                if cut and pos >= half:
                    raise ConnectionResetError("reset mid-body")
                yield self.data[pos:min(end, pos + (64 << 10))]

        return chunks(), lambda: None


def test_a_sub_range_broken_mid_way_is_reopened_where_it_stopped():
    """The ramp's second and third requests (each sharing a window with another request) are reset half-way: each
    is reopened from its first missing byte, nothing is fetched twice, and the stream's bytes are identical."""
    data = os.urandom(10 * MiB + 777)
    store = _Flaky(data, RemoteReads(lanes=4, window_bytes=4 * MiB, span_windows=1), {MiB, 3 * MiB})
    try:
        out = bytearray(len(data))
        reads = _reads(len(data), 1 << 20)
        store.expect(reads)
        for name, start, length in reads:
            store.stream_into(name, start, memoryview(out)[start:start + length])
        assert bytes(out) == data
        assert store.lanes.fetched_bytes == len(data)
        assert (MiB + MiB, 3 * MiB) in store.opened  # [1, 3 MiB) broken at 2 MiB, reopened there
        assert (3 * MiB + 3 * MiB // 2, 6 * MiB) in store.opened
    finally:
        store.close()


def test_small_windows_are_not_ramped():
    """Below two minimum pieces a window is one request: a ramp would only add round trips."""
    data = os.urandom(40 * (64 << 10))
    sizes: list[int] = []

    def fetch(name: str, start: int, end: int, take) -> None:
        sizes.append(end - start)
        take(memoryview(data)[start:end])

    lanes = Lanes(RemoteReads(lanes=4, window_bytes=64 << 10, span_windows=1), lambda n: len(data), fetch,
                  threading.Event())
    try:
        assert _read_all(lanes, len(data), 100_000) == data
    finally:
        lanes.close()
    assert MIN_PIECE > 64 << 10 and set(sizes) == {64 << 10}


def test_trace_records_each_get_and_wait(tmp_path):
    data = os.urandom(9 * MiB)

    def fetch(name: str, start: int, end: int, take) -> None:
        take(memoryview(data)[start:end])

    path = str(tmp_path / "trace.json")
    with trace.tracing(path):
        lanes = Lanes(RemoteReads(lanes=2, window_bytes=4 * MiB), lambda n: len(data), fetch, threading.Event(),
                      "s3://b/m")
        try:
            assert _read_all(lanes, len(data), MiB) == data
        finally:
            lanes.close()
        trace.mark("done")
    with open(path) as fh:
        events = json.load(fh)["events"]
    gets = [e for e in events if e["kind"] == "get"]
    assert sum(e["bytes"] for e in gets) == len(data)
    assert {e["input"] for e in gets} == {"s3://b/m"}
    assert all(e["t0"] <= e["first"] <= e["t1"] and e["thread"].startswith("graft-lane") for e in gets)
    assert [e["what"] for e in events if e["kind"] == "mark"] == ["done"]
    assert trace.recorder() is None  # off again once the job ended
