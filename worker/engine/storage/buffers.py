"""Reusable byte buffers for the stream: fresh multi-megabyte allocations cost page faults and zeroing
on every block, and would let memory drift; a small pool keeps both flat."""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A view of exactly `size` bytes over a pooled buffer (contents undefined)."""
        with self._lock:
            best = None
            for i, buf in enumerate(self._free):
                if size <= len(buf) <= 2 * size + (1 << 20) and (best is None or len(buf) < len(self._free[best])):
                    best = i
            buf = self._free.pop(best) if best is not None else None
        if buf is None:
            # Not bytearray(size): it zero-fills every page up front (16 MB a block, on the compute thread);
            # a fresh array's pages are mapped as they are first written, by whoever fills them.
            buf = np.empty(size, dtype=np.uint8)
        return memoryview(buf)[:size]

    def give(self, view: memoryview) -> None:
        buf = view.obj
        try:
            view.release()
        except BufferError:  # something still holds it: let it go rather than hand it out twice
            return
        with self._lock:
            self._free.append(buf)
