"""Parallel ranged reads of one remote input: several lanes (threads, each with its own pooled connection)
fill aligned windows of the input's files ahead of the stream, in the order the stream will read them.

A storage serves each connection at a capped rate (S3: roughly 50-100 MB/s), so an input read over one
connection is read at that rate whatever the compute could do; `lanes` ranged GETs at once read it that many
times faster. Memory is bounded per input by `windows` x `window_bytes` (the window being read plus one per
lane fetching ahead), whatever the model's size.

Where the stream says in advance which ranges it will read (`expect`), read-ahead follows that order exactly
(a target saved in another order than the sources is walked back to front, tensor by tensor) and the window
dropped for a new one is the one needed last. Without it, read-ahead follows the direction each file is
being walked in.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from worker.engine.errors import GraftError

Key = tuple[str, int]  # (file, window index)
# fetch(file, start, end, take): hand bytes [start, end) to `take` in order, each byte once, retrying faults.
Fetch = Callable[[str, int, int, Callable[[memoryview], None]], None]


@dataclass(frozen=True)
class RemoteReads:
    """How each remote input is read. `lanes`: ranged GETs in flight at once. `window_bytes`: the unit one
    lane fetches. `windows`: windows held per input (0: lanes + 1, the window being read and one per lane
    fetching ahead; never fewer). `span_windows`: adjacent windows one GET may cover when there are more
    windows to fetch than idle lanes (fewer requests; some S3-compatible servers pay for the whole object on
    each ranged GET). `stall_seconds`: a GET that receives no bytes for this long is re-issued from where it
    stopped (0: only the storage timeout applies)."""

    lanes: int = 8
    window_bytes: int = 16 << 20
    windows: int = 0
    span_windows: int = 8
    stall_seconds: float = 10.0

    @property
    def lane_count(self) -> int:
        return max(1, self.lanes)

    @property
    def held(self) -> int:
        return max(self.windows, self.lane_count + 1)

    @property
    def memory_bytes(self) -> int:
        return self.held * self.window_bytes

    def describe(self) -> dict:
        return {"lanes": self.lane_count, "window_bytes": self.window_bytes, "windows": self.held,
                "bytes": self.memory_bytes}


class _Window:
    """Bytes [start, start + length) of a file, filled front to back by one lane; readers copy out whatever is
    in already (below `filled`) while the rest arrives."""

    __slots__ = ("key", "start", "length", "buf", "filled", "error", "loading", "pins")

    def __init__(self, key: Key, start: int, length: int) -> None:
        self.key, self.start, self.length = key, start, length
        self.buf: bytearray | None = None  # window_bytes long, taken when its first bytes arrive
        self.filled = 0
        self.error: BaseException | None = None
        self.loading = False  # a lane is on it
        self.pins = 0  # readers using it: never dropped meanwhile

    @property
    def complete(self) -> bool:
        return self.filled == self.length


class _Schedule:
    """The windows the stream will read, in order, one entry per (read, window) pair; `cursor` is the first
    entry not yet served."""

    def __init__(self, uses: list[Key]) -> None:
        self.uses = uses
        self.pending: dict[Key, deque[int]] = {}
        for i, key in enumerate(uses):
            self.pending.setdefault(key, deque()).append(i)
        self.done = bytearray(len(uses))
        self.cursor = 0

    def served(self, keys: list[Key]) -> None:
        for key in keys:
            positions = self.pending.get(key)
            if positions:
                self.done[positions.popleft()] = 1
        while self.cursor < len(self.uses) and self.done[self.cursor]:
            self.cursor += 1

    def ahead(self, count: int) -> list[Key]:
        out: list[Key] = []
        seen: set[Key] = set()
        for i in range(self.cursor, len(self.uses)):
            if len(out) >= count:
                break
            if not self.done[i] and self.uses[i] not in seen:
                seen.add(self.uses[i])
                out.append(self.uses[i])
        return out

    def next_use(self, key: Key) -> int:
        positions = self.pending.get(key)
        return positions[0] if positions else len(self.uses)


class Lanes:
    """The windows of one input and the lanes that fill them. Thread-safe: the stream's readers call read()
    from a pool. `fetched_bytes` and `requests` count what was asked of the storage, `peak_lanes` and
    `peak_windows` the most lanes busy and windows held at once (tests, benches)."""

    def __init__(self, reads: RemoteReads, size: Callable[[str], int], fetch: Fetch,
                 closing: threading.Event) -> None:
        self.reads = reads
        self.width = reads.window_bytes
        self.cap = reads.held
        self.lanes = reads.lane_count
        self._size, self._fetch, self._closing = size, fetch, closing
        self._cond = threading.Condition()
        self._resident: dict[Key, _Window] = {}
        self._schedule: _Schedule | None = None
        self._walk: dict[str, tuple[int, int]] = {}  # without a schedule: file -> (window last read, step)
        self._recent: str | None = None
        self._busy = 0
        self._spare: list[bytearray] = []  # buffers of dropped windows: reused, never handed back to the OS
        self._pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="graft-lane")
        self.fetched_bytes = 0
        self.requests = 0
        self.peak_lanes = 0
        self.peak_windows = 0

    # --- what the store calls ------------------------------------------------------------------------------

    def expect(self, reads: list[tuple[str, int, int]]) -> None:
        """The (file, start, length) reads the stream will make, in order: fetching starts now."""
        uses: list[Key] = []
        for name, start, length in reads:
            end = min(start + length, self._size(name))  # a read past the end fails when it is made
            if end > start:
                uses.extend((name, i) for i in range(start // self.width, (end - 1) // self.width + 1))
        with self._cond:
            self._schedule = _Schedule(uses)
            self._pump()

    def read(self, name: str, start: int, view: memoryview) -> None:
        end = start + len(view)
        first, last = start // self.width, (end - 1) // self.width
        keys = [(name, i) for i in range(first, last + 1)]
        with self._cond:
            self._note_walk(name, first, last)
            windows = [self._pin(key) for key in keys]
            self._pump()
        try:
            for w in windows:
                lo, hi = max(start, w.start), min(end, w.start + w.length)
                self._wait(w, hi - w.start)
                assert w.buf is not None
                view[lo - start:hi - start] = memoryview(w.buf)[lo - w.start:hi - w.start]
        finally:
            with self._cond:
                for w in windows:
                    w.pins -= 1
                if self._schedule is not None:
                    self._schedule.served(keys)
                self._pump()

    def close(self) -> None:
        with self._cond:  # under the lock: no lane is started once closing is seen
            self._closing.set()
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            self._resident.clear()
            self._spare.clear()

    # --- inside (the lock held) ----------------------------------------------------------------------------

    def _new(self, key: Key) -> _Window:
        start = key[1] * self.width
        return _Window(key, start, min(self.width, self._size(key[0]) - start))

    def _pin(self, key: Key) -> _Window:
        w = self._resident.get(key)
        if w is None:  # wanted now: held even past `cap` (by at most one window per reader)
            w = self._resident[key] = self._new(key)
            self.peak_windows = max(self.peak_windows, len(self._resident))
        w.pins += 1
        return w

    def _wait(self, w: _Window, need: int) -> None:
        with self._cond:
            while w.filled < need:
                if w.error is not None:
                    err = w.error
                    if isinstance(err, GraftError):  # a copy: several readers may raise it at once
                        raise GraftError(err.code, err.message, err.details) from err
                    raise GraftError("storage_error", f"reading {w.key[0]} failed: {err}") from err
                if self._closing.is_set():
                    raise GraftError("storage_error", f"{w.key[0]}: the input was closed while being read")
                self._cond.wait(1.0)

    def _note_walk(self, name: str, first: int, last: int) -> None:
        prev = self._walk.get(name)
        step = 1
        if prev is not None:
            p_last, p_step = prev
            step = -1 if first < p_last else 1 if last > p_last else p_step
        self._walk[name] = (first if step < 0 else last, step)
        self._recent = name

    def _desired(self) -> list[Key]:
        """The windows that should be held now, soonest needed first."""
        if self._schedule is not None:
            return self._schedule.ahead(self.cap)
        if self._recent is None:
            return []
        name = self._recent
        last, step = self._walk[name]
        count = -(-self._size(name) // self.width)
        return [(name, i) for i in (last + step * k for k in range(self.cap)) if 0 <= i < count]

    def _next_use(self, w: _Window) -> float:
        if self._schedule is not None:
            return self._schedule.next_use(w.key)
        name, index = w.key
        last = self._walk.get(name, (index, 1))[0]
        return abs(index - last) + (0 if name == self._recent else 1 << 30)

    def _make_room(self, desired: set[Key]) -> bool:
        if len(self._resident) < self.cap:
            return True
        victims = [w for w in self._resident.values() if not w.pins and not w.loading and w.key not in desired]
        if not victims:
            return False
        victim = max(victims, key=self._next_use)
        del self._resident[victim.key]
        if victim.buf is not None:
            self._spare.append(victim.buf)
        return True

    def _pump(self) -> None:
        """Put idle lanes to work: windows readers wait for first, then the read-ahead in reading order."""
        if self._closing.is_set() or self._busy >= self.lanes:
            return
        desired = self._desired()
        wanted = set(desired)
        waiting = sorted((w for w in self._resident.values() if w.pins and not w.loading and not w.complete),
                         key=self._next_use)
        todo = [w.key for w in waiting] + [k for k in desired if k not in self._resident
                                           or not (self._resident[k].loading or self._resident[k].complete)]
        for i, key in enumerate(todo):
            if self._busy >= self.lanes:
                break
            w = self._resident.get(key)
            if w is not None and (w.loading or w.complete):
                continue  # taken into an earlier run of this pass
            if w is None:
                if not self._make_room(wanted):
                    break
                w = self._resident[key] = self._new(key)
            # More windows to fetch than idle lanes: adjacent ones go into the same request.
            share = max(1, (len(todo) - i) // (self.lanes - self._busy))
            run = [w]
            while len(run) < min(self.reads.span_windows, share):
                nxt = (key[0], key[1] + len(run))
                if nxt not in wanted or nxt[1] * self.width >= self._size(key[0]):
                    break
                x = self._resident.get(nxt)
                if x is None:
                    if not self._make_room(wanted):
                        break
                    x = self._resident[nxt] = self._new(nxt)
                elif x.loading or x.complete:
                    break
                run.append(x)
            for x in run:
                x.loading = True
            self._busy += 1
            self.requests += 1
            self.peak_lanes = max(self.peak_lanes, self._busy)
            self.peak_windows = max(self.peak_windows, len(self._resident))
            self._pool.submit(self._load, run)

    # --- on a lane -----------------------------------------------------------------------------------------

    def _load(self, run: list[_Window]) -> None:
        name = run[0].key[0]
        at = 0  # the window of the run being filled

        def take(data: memoryview) -> None:
            nonlocal at
            while len(data):
                w = run[at]
                if w.buf is None:
                    with self._cond:
                        spare = self._spare.pop() if self._spare else None
                    w.buf = spare if spare is not None else bytearray(self.width)
                n = min(len(data), w.length - w.filled)
                w.buf[w.filled:w.filled + n] = data[:n]  # above `filled`: no reader looks there yet
                data = data[n:]
                with self._cond:
                    w.filled += n
                    self.fetched_bytes += n
                    self._cond.notify_all()
                if w.complete:
                    at += 1

        try:
            self._fetch(name, run[0].start, run[-1].start + run[-1].length, take)
        except BaseException as exc:
            with self._cond:
                for w in run:
                    if not w.complete:
                        w.error = exc
                        if self._resident.get(w.key) is w:
                            del self._resident[w.key]
        finally:
            with self._cond:
                for w in run:
                    w.loading = False
                self._busy -= 1
                self._cond.notify_all()
                self._pump()
