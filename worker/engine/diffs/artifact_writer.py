"""Writing a diff artifact's shards: each tensor's encoded parts are spooled to local scratch files while its
encoder runs (a part's length is known only once it is written, and a safetensors header, which comes first,
names every length), then a shard is written header first through the job's sink once its tensors are done.
Memory: a copy buffer; scratch disk: one shard's worth at most."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from worker.engine.errors import GraftError
from worker.engine.storage.safetensors_format import build_header, itemsize
from worker.engine.storage.sinks import FileRecord, Sink

COPY_BYTES = 8 << 20
SPILL_BYTES = 4 << 20  # a part past this goes to a scratch file
HELD_BYTES = 64 << 20  # and all of a shard's waiting parts, once they hold this much
PART_SEPARATOR = "::"  # a shard entry is "<tensor>::<part>"


def entry_name(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEPARATOR}{part}"


class _Spool:
    """One part being written: held in memory while small (most parts of most tensors: sketches, counts,
    scales), appended to its own scratch file past SPILL_BYTES."""

    def __init__(self, path: str, dtype: str) -> None:
        self.path, self.dtype, self.nbytes = path, dtype, 0
        self.held: bytearray | None = bytearray()
        self._file = None

    def spill(self) -> None:
        """To its scratch file from now on (what it held goes first)."""
        if self.held is not None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close(), on every path through TensorParts
            self._file.write(self.held)
            self.held = None

    def write(self, data: bytes | memoryview) -> None:
        if self.held is not None and len(self.held) + len(data) > SPILL_BYTES:
            self.spill()
        if self.held is not None:
            self.held += data
        else:
            self._file.write(data)
        self.nbytes += len(data)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    @property
    def held_bytes(self) -> int:
        return len(self.held) if self.held is not None else 0

    def copy_into(self, writer) -> None:
        if self.held is not None:
            writer.write(self.held)
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(COPY_BYTES):
                writer.write(chunk)
        os.unlink(self.path)


@dataclass
class TensorParts:
    """The PartWriter of one tensor (encodings/base.py): its parts in the order written."""

    tensor: str
    directory: str
    serial: int
    parts: dict[str, _Spool] = field(default_factory=dict)

    def part(self, name: str, dtype: str) -> _Spool:
        if name in self.parts:
            raise GraftError("internal_error", f"{self.tensor}: part {name} written twice")
        for spool in self.parts.values():
            spool.close()
        path = os.path.join(self.directory, f"{self.serial}-{len(self.parts)}.part")
        spool = self.parts[name] = _Spool(path, dtype)
        return spool

    def add_bytes(self, name: str, dtype: str, data: bytes | memoryview) -> None:
        self.part(name, dtype).write(data)

    def close(self) -> None:
        for spool in self.parts.values():
            spool.close()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.parts.values())


class ArtifactWriter:
    """Shards of encoded parts, `diff-00001.safetensors` onwards, each at most `shard_bytes` of data (a tensor's
    parts stay together in one shard, so a bigger tensor makes a bigger shard)."""

    def __init__(self, sink: Sink, shard_bytes: int, scratch_dir: str | None = None) -> None:
        self.sink, self.shard_bytes = sink, shard_bytes
        self._scratch = tempfile.TemporaryDirectory(prefix="graft-diff-", dir=scratch_dir or None)
        self._pending: list[TensorParts] = []
        self.records: list[FileRecord] = []
        self.placed: dict[str, str] = {}  # tensor -> its shard's file
        self._made = 0
        self._held = 0  # bytes the pending tensors' parts hold in memory
        self._pending_bytes = 0

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for parts in self._pending:
            parts.close()
        self._pending.clear()
        self._scratch.cleanup()

    def tensor(self, name: str) -> TensorParts:
        self._made += 1
        return TensorParts(name, self._scratch.name, self._made)

    def add(self, parts: TensorParts) -> None:
        """A tensor whose parts are complete: queued for the current shard, written when the shard fills."""
        parts.close()
        for spool in parts.parts.values():
            if spool.nbytes % itemsize(spool.dtype):
                raise GraftError("internal_error", f"{parts.tensor}: a part's bytes are not whole {spool.dtype}")
        self._pending.append(parts)
        self._pending_bytes += parts.nbytes
        self._held += sum(s.held_bytes for s in parts.parts.values())
        if self._held > HELD_BYTES:  # the shard's tensors waiting in memory: to scratch files, all of them
            for waiting in self._pending:
                for spool in waiting.parts.values():
                    spool.spill()
                    spool.close()
            self._held = 0
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"diff-{len(self.records) + 1:05d}.safetensors"
        entries = [(entry_name(p.tensor, part), spool.dtype, (spool.nbytes // itemsize(spool.dtype),))
                   for p in self._pending for part, spool in p.parts.items()]
        header, _offsets = build_header(entries, {"format": "graft-diff"})
        data = sum(p.nbytes for p in self._pending)
        writer = self.sink.open(name, len(header) + data)
        try:
            writer.write(header)
            for p in self._pending:
                for spool in p.parts.values():
                    spool.copy_into(writer)
                p.parts.clear()
                self.placed[p.tensor] = name
            self.records.append(writer.close())
        except BaseException:
            writer.abort()
            raise
        self._pending.clear()
        self._pending_bytes = self._held = 0

