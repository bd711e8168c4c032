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

A cold start (every lane idle at once) is ramped: lane k of n first fetches k/n of a window's bytes, in reading
order, so that the first bytes reach the stream after 1/n of a window's time instead of a whole window's, and
the lanes end their first requests one after the other; each then goes on with whole windows, and the
staggering stays: a window completes every 1/n of a window's time, in the order the stream reads them, rather
than n windows at once every window's time (a stream that waits for the first of them while the rest sit in
memory, and lanes that wait for room meanwhile). A window may thus be filled by several requests at once,
each its own sub-range; readers see its bytes up to the first one not in yet.

The end is ramped down the same way: once less than a window per lane is left to fetch of what the stream
announced, a request takes at most 1/n of what is left (and at least a minimum piece), so the lanes end
together rather than one after the other, the last of them a whole window's time after the first.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from worker.engine.errors import GraftError
from worker.engine.storage import trace

Key = tuple[str, int]  # (file, window index)
# fetch(file, start, end, take): hand bytes [start, end) to `take` in order, each byte once, retrying faults.
Fetch = Callable[[str, int, int, Callable[[memoryview], None]], None]


@dataclass(frozen=True)
class RemoteReads:
    """How each remote input is read. `lanes`: ranged GETs in flight at once. `window_bytes`: the unit one
    lane fetches. `windows`: windows held per input (0: lanes + 1, the window being read and one per lane
    fetching ahead; never fewer). `span_windows`: adjacent windows one GET may cover when there are more
    windows to fetch than idle lanes (fewer requests, for S3-compatible servers that pay for the whole object on
    each ranged GET; 1 by default: a span delays the windows at its end, which the stream needs in order, and
    undoes the ramp's staggering). `stall_seconds`: a GET that receives no bytes for this long is re-issued
    from where it stopped (0: only the storage timeout applies)."""

    lanes: int = 8
    window_bytes: int = 16 << 20
    windows: int = 0
    span_windows: int = 1
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


MIN_PIECE = 1 << 20  # a ramp's smallest request: below it, a request's round trip costs more than its bytes


class _Window:
    """Bytes [start, start + length) of a file, handed to requests front to back (`claimed`), each filling its
    sub-range front to back; readers copy out whatever is in already (below `filled`, the bytes up to the first
    sub-range not complete) while the rest arrives."""

    __slots__ = ("key", "start", "length", "buf", "filled", "claimed", "segs", "error", "loading", "pins")

    def __init__(self, key: Key, start: int, length: int) -> None:
        self.key, self.start, self.length = key, start, length
        self.buf: bytearray | None = None  # window_bytes long, taken when its first bytes arrive
        self.filled = 0
        self.claimed = 0
        self.segs: list[list[int]] = []  # [lo, hi, pos) of each request's sub-range, in order: pos = filled to
        self.error: BaseException | None = None
        self.loading = 0  # requests on it
        self.pins = 0  # readers using it: never dropped meanwhile

    @property
    def complete(self) -> bool:
        return self.filled == self.length

    @property
    def taken(self) -> bool:
        """Every byte is some request's."""
        return self.claimed == self.length

    def claim(self, want: int) -> list[int]:
        seg = [self.claimed, min(self.length, self.claimed + want), self.claimed]
        self.claimed = seg[1]
        self.segs.append(seg)
        return seg

    def advance(self) -> None:
        """`filled` moved up to the first sub-range not complete (sub-ranges are claimed contiguously)."""
        for lo, hi, pos in self.segs:
            if lo > self.filled:
                return
            if pos < hi:
                self.filled = max(self.filled, pos)
                return
            self.filled = max(self.filled, hi)


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
                 closing: threading.Event, label: str = "") -> None:
        self.reads, self.label = reads, label
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
        self._left: int | None = None  # bytes of the announced reads not yet any request's (a re-fetch counts twice)
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
            self._left = sum(self._new(key).length for key in dict.fromkeys(uses))
            self._pump()

    def read(self, name: str, start: int, view: memoryview) -> None:
        end = start + len(view)
        first, last = start // self.width, (end - 1) // self.width
        keys = [(name, i) for i in range(first, last + 1)]
        with self._cond:
            self._note_walk(name, first, last)
            windows = [self._pin(key) for key in keys]
            self._pump()
        rec = trace.recorder()
        try:
            for w in windows:
                lo, hi = max(start, w.start), min(end, w.start + w.length)
                if rec is not None and w.filled < hi - w.start:
                    t_wait = rec.now()
                    self._wait(w, hi - w.start)
                    rec.add("wait", t_wait, input=self.label, file=name, window=w.key[1])
                else:
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
        """Put idle lanes to work: windows readers wait for first, then the read-ahead in reading order; a cold
        start ramped (see the module's docstring)."""
        if self._closing.is_set() or self._busy >= self.lanes:
            return
        desired = self._desired()
        wanted = set(desired)
        waiting = sorted((w for w in self._resident.values() if w.pins and not w.taken), key=self._next_use)
        todo = list(dict.fromkeys([w.key for w in waiting] + [k for k in desired if k not in self._resident
                                                              or not self._resident[k].taken]))
        # Windows a reader made past `cap` (it waits on them) are paid for now, by the ones needed last.
        while len(self._resident) > self.cap and self._make_room(wanted):
            pass
        ramp = self._busy == 0 and self.lanes > 1 and self.width >= 2 * MIN_PIECE
        piece = max(MIN_PIECE, self.width // self.lanes)
        i = step = 0
        while i < len(todo) and self._busy < self.lanes:
            w = self._resident.get(todo[i])
            if w is None:
                if not self._make_room(wanted):
                    break
                w = self._resident[todo[i]] = self._new(todo[i])
            if w.taken:  # by an earlier request of this pass
                i += 1
                continue
            step += 1
            if ramp:
                want = step * piece
            else:  # more windows to fetch than idle lanes: adjacent ones go into the same request
                share = max(1, (len(todo) - i) // (self.lanes - self._busy))
                want = w.length - w.claimed + (min(self.reads.span_windows, share) - 1) * self.width
                if self._left is not None and self.width >= 2 * MIN_PIECE and self._left < self.lanes * self.width:
                    want = min(want, max(MIN_PIECE, -(-self._left // self.lanes)))  # the end ramped down
            self._submit(self._request(w, want, wanted))

    def _request(self, w: _Window, want: int, wanted: set[Key]) -> list[tuple[_Window, list[int]]]:
        """`want` bytes from `w`'s first unclaimed one, on into the adjacent windows while they are wanted and
        untouched (one ranged GET)."""
        req = [(w, w.claim(want))]
        want -= req[0][1][1] - req[0][1][0]
        self._claimed(req[0][1])
        name, index = w.key
        while want > 0:
            nxt = (name, index + len(req))
            if nxt not in wanted or nxt[1] * self.width >= self._size(name):
                break
            x = self._resident.get(nxt)
            if x is None:
                if not self._make_room(wanted):
                    break
                x = self._resident[nxt] = self._new(nxt)
            elif x.claimed:
                break
            seg = x.claim(want)
            want -= seg[1] - seg[0]
            self._claimed(seg)
            req.append((x, seg))
        return req

    def _claimed(self, seg: list[int]) -> None:
        if self._left is not None:
            self._left = max(0, self._left - (seg[1] - seg[0]))

    def _submit(self, req: list[tuple[_Window, list[int]]]) -> None:
        for x, _seg in req:
            x.loading += 1
        self._busy += 1
        self.requests += 1
        self.peak_lanes = max(self.peak_lanes, self._busy)
        self.peak_windows = max(self.peak_windows, len(self._resident))
        self._pool.submit(self._load, req)

    # --- on a lane -----------------------------------------------------------------------------------------

    def _buffer(self, w: _Window) -> bytearray:
        with self._cond:
            if w.buf is not None:
                return w.buf
            spare = self._spare.pop() if self._spare else None
        buf = spare if spare is not None else bytearray(self.width)  # zeroed outside the lock
        with self._cond:
            if w.buf is None:
                w.buf = buf
            else:  # another request of the window took one meanwhile
                self._spare.append(buf)
            return w.buf

    def _load(self, req: list[tuple[_Window, list[int]]]) -> None:
        name = req[0][0].key[0]
        at = 0  # the sub-range being filled
        rec = trace.recorder()
        t_start = rec.now() if rec is not None else 0.0
        first: list[float] = []
        start, end = req[0][0].start + req[0][1][0], req[-1][0].start + req[-1][1][1]

        def take(data: memoryview) -> None:
            nonlocal at
            if rec is not None and not first:
                first.append(rec.now())
            while len(data):
                w, seg = req[at]
                buf = w.buf if w.buf is not None else self._buffer(w)
                n = min(len(data), seg[1] - seg[2])
                buf[seg[2]:seg[2] + n] = data[:n]  # above `filled`: no reader looks there yet
                data = data[n:]
                with self._cond:
                    seg[2] += n
                    w.advance()
                    self.fetched_bytes += n
                    self._cond.notify_all()
                if seg[2] == seg[1]:
                    at += 1

        try:
            self._fetch(name, start, end, take)
            if rec is not None:
                rec.add("get", t_start, input=self.label, file=name, start=start, bytes=end - start,
                        first=round(first[0], 4) if first else None)
        except BaseException as exc:
            with self._cond:
                for w, _seg in req:
                    if not w.complete:
                        w.error = exc
                        if self._resident.get(w.key) is w:
                            del self._resident[w.key]
        finally:
            with self._cond:
                for w, _seg in req:
                    w.loading -= 1
                self._busy -= 1
                self._cond.notify_all()
                self._pump()
