"""A large output file written around the page cache (O_DIRECT), through page-aligned staging buffers.

Through the page cache, a graft's writes cost the kernel's copy into freshly allocated pages plus their
writeback, on this VM 0.2 to 2.2 CPU seconds a GB, varying from run to run with the cache's state (issue 15's
apply bench: the writer's syscalls took 0.8-2.2 of a job's 3.4-6 streaming CPU seconds). A direct write moves
the buffer to the disk by DMA: the CPU's work is one copy into the staging buffer (about 0.1 s a GB) and the
call itself, steadily. The staging copy is needed because a block's bytes start at any offset of the file,
and a direct write wants its buffer, offset and length aligned (4096 covers every common logical block size).

Where the file system refuses O_DIRECT (tmpfs, some network file systems), the file is written as before.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

ALIGN = 4096
STAGING_BYTES = 8 << 20  # one staging buffer; two alternate (one filling while the other is written)
DIRECT_MIN_BYTES = 64 << 20  # smaller files go through the page cache: configs, tokenizers, small shards


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off on an open descriptor (Linux lets F_SETFL change it); False where refused."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except OSError:
        return False
    return True


def _pwrite_all(fd: int, buf: mmap.mmap, start: int, stop: int, offset: int) -> None:
    """Bytes [start, stop) of `buf` at `offset`. The view is released before this returns, so the buffer can be
    closed as soon as the write is waited for (a view kept by the pool's work item would forbid that)."""
    with memoryview(buf) as whole:
        view = whole[start:stop]
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        finally:
            view.release()


class DirectFile:
    """Appends to `fd` (opened for writing, O_DIRECT already set) from offset 0: full staging buffers are
    written on `io` while the next fills; finish() writes the tail, its unaligned end through the page cache.
    Errors of a write surface on the next append or at finish()."""

    def __init__(self, fd: int, io: ThreadPoolExecutor) -> None:
        self.fd, self.io = fd, io
        self._buffers = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)]  # page-aligned
        self._current, self._fill, self._offset = 0, 0, 0
        self._pending: Future | None = None

    def append(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            buf = self._buffers[self._current]
            n = min(len(view), STAGING_BYTES - self._fill)
            buf[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == STAGING_BYTES:
                self._submit(STAGING_BYTES)

    def _submit(self, length: int) -> None:
        self._wait()  # the other buffer's write, before that buffer is filled again
        self._pending = self.io.submit(_pwrite_all, self.fd, self._buffers[self._current], 0, length, self._offset)
        self._offset += length
        self._current ^= 1
        self._fill = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Everything appended is written (not yet synced); the staging buffers are released."""
        try:
            fill, aligned = self._fill, self._fill // ALIGN * ALIGN
            if aligned:
                self._submit(aligned)
                self._current ^= 1  # the tail's bytes stay where they are: in the buffer just submitted
            self._wait()
            if fill > aligned:
                set_direct(self.fd, False)
                _pwrite_all(self.fd, self._buffers[self._current], aligned, fill, self._offset)
        finally:
            self.close()

    def close(self) -> None:
        """Release the staging buffers, a write still in flight waited for (its error dropped: an abort)."""
        try:
            self._wait()
        except OSError:
            pass
        finally:
            for buf in self._buffers:
                buf.close()
            self._buffers = []
