"""Write side: an output directory or prefix that only becomes a result when committed.

Files are streamed (sha256 computed on the way); the manifest goes last. Local outputs are built in a
hidden sibling directory and renamed into place (local_files.LocalSink); S3 outputs are uploaded under the
final prefix, and a prefix without `graft-manifest.json` is not a result (s3_sink.S3Sink). Abort removes
whatever was written. Each scheme's sink is opened through its row in storage/schemes/; this module holds
what they share.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import import_module

from worker.engine.storage import schemes
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.schemes.base import Access
from worker.engine.storage.uris import Location

MANIFEST = "graft-manifest.json"
OWNER = ".graft-owner"  # in a local temp output: "host pid" of the process writing it
PENDING = ".graft-pending"  # S3: marks a prefix a graft is writing (removed once the manifest is in)
STAGING = ".graft-tmp-"  # a local output is built in `.<name>.graft-tmp-<hex>` beside it, then renamed


@dataclass
class FileRecord:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class FileWriter(ABC):
    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, data) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._write(data)

    @abstractmethod
    def _write(self, data) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    def close(self) -> FileRecord:
        self._finish()
        return FileRecord(self.name, self.size, self._sha.hexdigest())

    def abort(self) -> None:  # noqa: B027 - optional hook
        pass


class Sink(ABC):
    location: Location

    @abstractmethod
    def open(self, name: str, expected_size: int | None = None) -> FileWriter: ...

    def put(self, name: str, data: bytes) -> FileRecord:
        writer = self.open(name, len(data))
        writer.write(data)
        return writer.close()

    @abstractmethod
    def commit(self, manifest: bytes) -> str:
        """Publish: the manifest is written last; returns the manifest's URI."""

    @abstractmethod
    def abort(self) -> None: ...

    @abstractmethod
    def abandon(self) -> None:
        """Stop writing without removing anything: another writer owns the output now."""

    def detach(self) -> None:
        """Let go of the sink leaving what it wrote and its claim in place: the tasks of a split graft write
        the rest (pipeline/shards.py)."""
        self.abandon()

    def staged(self) -> Location:
        """Where what has been written so far can be read back before the commit (an evaluation of the output
        reads it there): every file put or closed is complete there; no manifest yet."""
        return self.location


def open_sink(location: Location, *, endpoint_url: str | None = None, part_bytes: int = 8 << 20,
              parts_in_flight: int = 16, writer: str | None = None, allowed_roots: list[str] | None = None,
              denied_roots: list[str] | None = None, retry: StorageRetry | None = None,
              manifest_name: str | None = None, split: str = "") -> Sink:
    """The sink of `location`'s scheme. `allowed_roots`/`denied_roots` confine a local output (see
    stores.Confinement); None: unconfined. `part_bytes`, `parts_in_flight`: an S3 output's multipart uploads.
    `split`: a graft split into tasks; "claim" claims the output for `writer` (staged under a name it gives,
    so that other processes find it), "join" writes into that claim: nothing is cleared or claimed, each file
    lands whole or not at all (a duplicated task rewrites the same bytes), an abort removes only unfinished
    files."""
    access = Access(endpoint_url=endpoint_url, retry=retry, allowed_roots=allowed_roots, denied_roots=denied_roots,
                    part_bytes=part_bytes, parts_in_flight=parts_in_flight, writer=writer,
                    manifest_name=manifest_name, split=split)
    return schemes.get(location.scheme).open_sink(location, access)


# Where these lived before the schemes table: importers of the old names need not change.
_MOVED = {"LocalSink": "local_files", "remove_orphans": "local_files", "S3Sink": "s3_sink",
          "object_exists": "s3_sink"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"worker.engine.storage.{_MOVED[name]}"), name)
