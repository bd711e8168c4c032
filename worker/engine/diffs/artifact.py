"""Reading a diff artifact: its manifest checked, its shards checked against their sha256 before anything is
planned, and the artifact presented to the planner as the two sides of the source pair it was extracted from
(their recorded headers and configs), whose transferred tensors read the decoded delta and whose fine-tune's
extra rows read the stored rows, through one store (ArtifactStore) that decodes on the reader's threads.

The format is README's "Diff artifacts" section; `DiffManifest` is its schema."""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.engine.compute.patches import Patch
from worker.engine.diffs.artifact_writer import entry_name
from worker.engine.diffs.encodings import ENCODINGS
from worker.engine.diffs.shard_cache import CopySink, KeptShards, ShardCache
from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.lanes import RemoteReads
from worker.engine.storage.local_files import LocalStore
from worker.engine.storage.model import TOKENIZER_FILES, ResolvedModel, _read_header
from worker.engine.storage.safetensors_format import DTYPES, TensorInfo, itemsize, load_json
from worker.engine.storage.stores import Store, open_store
from worker.engine.storage.uris import Location

DIFF_MANIFEST = "diff-manifest.json"
FORMAT = "graft-diff/2"  # what extraction writes: /2 may hold exact's layout-2 frames, which a /1 reader cannot
READ_FORMATS = ("graft-diff/1", "graft-diff/2")  # a reader of /1 refuses /2 by its format, cleanly
DELTA_FILE = "delta/"  # virtual files of the ArtifactStore: "delta/<tensor>", "rows/<tensor>"
ROWS_FILE = "rows/"
HASH_CHUNK = 8 << 20
MIN_HASH_CHUNK = 1 << 20
HASH_LANES = 8  # ranged reads in flight per shard while it is verified (GRAFT_REMOTE_LANES' default)
SMALL_PART = 4 << 20  # parts up to this size are read whole once per graft and kept (to CACHE_BYTES in all)
CACHE_BYTES = 64 << 20
BASE_PREFIX = "source_base."  # the source base's tokenizer files, beside the fine-tune's own

Count = Annotated[int, Field(ge=0, le=1 << 62)]
Shape = Annotated[list[Count], Field(max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordedTensor(_Strict):
    """A source tensor's header entry, as resolved at extraction."""

    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: Shape
    file: str = Field(max_length=1024)
    start: Count
    end: Count


class RecordedSource(_Strict):
    uri: str
    revision: str | None = None
    config: dict
    files: dict[str, dict]  # name -> {"size", "sha256"?, ...}: the InputHasher's record
    weight_files: list[str]
    tensors: dict[str, RecordedTensor]


class StoredRows(_Strict):
    """The fine-tune's rows past its base's: rows [first_row, first_row + rows) of the fine-tune."""

    first_row: Count
    rows: Count
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]


class StoredTensor(_Strict):
    shape: Shape  # of the delta: the rows base and fine-tune share
    compute: Literal["F32", "F64"]
    stored: str  # the encoding that holds it (the artifact's, or exact where that one does not apply)
    meta: dict
    parts: list[str]
    shard: str
    encoded_bytes: Count
    rel_frobenius: float | None
    max_abs: float | None
    extra: dict = Field(default_factory=dict)
    norms: dict[str, float]  # delta_sq, base_sq, base_delta: float64 sums over the delta's elements
    sketch: bool = True
    rows: StoredRows | None = None


class ShardRecord(_Strict):
    path: str = Field(max_length=255)
    size: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DiffManifest(BaseModel):
    model_config = ConfigDict(extra="allow")  # reports (totals, stats, warnings) are the writer's to add to
    format: Literal["graft-diff/1", "graft-diff/2"]
    encoding: dict
    sources: dict[Literal["source_base", "source_finetuned"], RecordedSource]
    tensors: dict[str, StoredTensor]
    shards: list[ShardRecord]
    changed_buffers: list[str] = Field(default_factory=list)
    content_address: str


def _invalid(uri: str, message: str) -> GraftError:
    return GraftError("invalid_diff", f"{uri}: {message}", {"diff": uri})


def read_manifest(store: Store, uri: str) -> DiffManifest:
    if not store.exists(DIFF_MANIFEST):
        raise _invalid(uri, f"no {DIFF_MANIFEST}: not a diff artifact, or one whose extraction did not finish")
    raw = load_json(store.read_bytes(DIFF_MANIFEST), f"{uri}/{DIFF_MANIFEST}", "invalid_diff", unique_keys=True)
    if not isinstance(raw, dict) or raw.get("format") not in READ_FORMATS:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise _invalid(uri, f"{DIFF_MANIFEST} is not a {' or '.join(READ_FORMATS)} manifest (format {found!r})")
    paths = [s.get("path") for s in raw.get("shards", []) if isinstance(s, dict)]
    if len(paths) != len(set(map(str, paths))):
        raise _invalid(uri, f"{DIFF_MANIFEST} lists a shard twice")
    try:
        return DiffManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise _invalid(uri, f"{DIFF_MANIFEST}: {where}: {err['msg']}") from None


def _digest(store: Store, name: str, size: int, cache) -> str:
    """A shard's sha256. A remote shard is read in HASH_CHUNK ranges, HASH_LANES at once and hashed in order:
    storage serves each connection at a capped rate, and one connection for a whole shard was most of an S3
    apply's time (25 s of 52 for an exact artifact at 5 MB/s a connection)."""
    if cache is not None and isinstance(store, LocalStore):
        return cache.digest(store.path(name))
    identity = _remote_identity(store, name, size)
    if cache is not None and identity is not None and (known := cache.known(identity)) is not None:
        return known
    digest = _read_and_hash(store, name, size)
    if cache is not None and identity is not None:
        cache.remember(identity, digest)
    return digest


def _remote_identity(store: Store, name: str, size: int) -> str | None:
    """What names one version of a remote shard: its URI, size and ETag (S3 gives an object a new ETag whenever
    it is written), so that applying one artifact to many bases reads and hashes it once, as a local one is
    (DigestCache). None where the store keeps no such token: then every apply hashes it."""
    etag = store.fingerprint(name).get("etag")
    return f"{store.location}/{name}|{size}|etag={etag}" if etag else None


def _read_and_hash(store: Store, name: str, size: int, sink: CopySink | None = None) -> str:
    """The shard's sha256, its bytes also written to `sink` in order (a kept copy: shard_cache.py)."""
    sha = hashlib.sha256()
    # A small shard is cut so that every lane takes a part: storage caps each connection, and an 8 MB shard in
    # 8 MB ranges was one connection's time (1.7 s at 5 MB/s, issue 15's S3 bench, against 0.2 s over 8 lanes).
    chunk = min(HASH_CHUNK, max(MIN_HASH_CHUNK, -(-size // HASH_LANES)))
    starts = range(0, size, chunk)

    def take(future) -> None:
        data = future.result()
        sha.update(data)
        if sink is not None:
            sink.write(data)

    with ThreadPoolExecutor(max_workers=HASH_LANES, thread_name_prefix="graft-verify") as pool:
        window: list = []
        for start in starts:  # at most HASH_LANES chunks read ahead of the hash: memory HASH_LANES x HASH_CHUNK
            window.append(pool.submit(store.read_range, name, start, min(chunk, size - start)))
            if len(window) >= HASH_LANES:
                take(window.pop(0))
        for future in window:
            take(future)
    return sha.hexdigest()


def verify_shards(store: Store, manifest: DiffManifest, uri: str, cache=None,
                  kept: ShardCache | None = None) -> dict[str, int]:
    """Every shard the manifest names is there with its size and sha256 (`cache`: a DigestCache for local
    files, so applying one artifact to many bases hashes it once). With `kept`, a remote shard's verified bytes
    are kept as a local copy (shard_cache.py): returns the read descriptors of those, by shard name, which the
    caller closes."""
    for shard in manifest.shards:
        if "/" in shard.path or not store.exists(shard.path):
            raise _invalid(uri, f"shard {shard.path!r} named by the manifest is missing")
        if store.size(shard.path) != shard.size:
            raise _invalid(uri, f"shard {shard.path}: {store.size(shard.path)} bytes, the manifest says {shard.size}")
    fds: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(manifest.shards)))) as pool:
            futures = [pool.submit(_check_shard, store, s, cache, kept) for s in manifest.shards]
            failure = None
            digests = {}
            for shard, future in zip(manifest.shards, futures, strict=True):  # every one waited for: its fd kept
                try:
                    digests[shard.path], fd = future.result()
                except BaseException as exc:  # the first failure is raised once all are in (none left open)
                    failure = failure or exc
                    continue
                if fd is not None:
                    fds[shard.path] = fd
            if failure is not None:
                raise failure
        if cache is not None:
            cache.save()
        for shard in manifest.shards:
            if digests[shard.path] != shard.sha256:
                raise _invalid(uri, f"shard {shard.path} does not match its sha256 (changed or damaged since "
                               "extraction)")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _check_shard(store: Store, shard: ShardRecord, cache, kept: ShardCache | None) -> tuple[str, int | None]:
    """(the shard's sha256, a descriptor of its kept verified copy or None)."""
    identity = None if kept is None or isinstance(store, LocalStore) else _remote_identity(store, shard.path,
                                                                                           shard.size)
    if identity is None or shard.size > kept.limit:  # no copy to keep: the digest remembered per version
        return _digest(store, shard.path, shard.size, cache), None
    fd = kept.lookup(identity, shard.size, shard.sha256)
    if fd is not None:
        return shard.sha256, fd
    fd, digest = kept.fetch(identity, shard.size, shard.sha256,
                            lambda sink: _read_and_hash(store, shard.path, shard.size, sink))
    if cache is not None:
        cache.remember(identity, digest)
    return digest, fd


class _PartCache:
    """A tensor's small parts (exact's frame offsets, sparse's counts, a low-rank factor's V, int8's scales),
    read whole once and kept, least recently used first out, to a bounded total: each decode of a piece reads
    them, and from S3 every read is a request."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit, self.size = limit, 0
        self._parts: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], load) -> bytes:
        with self._lock:
            data = self._parts.get(key)
            if data is not None:
                self._parts.move_to_end(key)
                return data
        data = load()
        with self._lock:
            if key not in self._parts:
                self._parts[key] = data
                self.size += len(data)
            while self.size > self.limit and self._parts:
                _key, old = self._parts.popitem(last=False)
                self.size -= len(old)
        return data


class _EntryReader:
    """PartReader (encodings/base.py) of one tensor: ranged reads of its parts' entries (small parts from the
    store's cache)."""

    def __init__(self, store: Store, entries: dict[str, TensorInfo], tensor: str,
                 cache: _PartCache | None = None) -> None:
        self.store, self.entries, self.tensor, self.cache = store, entries, tensor, cache
        self.bytes_read = 0

    def _entry(self, name: str) -> TensorInfo:
        info = self.entries.get(entry_name(self.tensor, name))
        if info is None:
            raise GraftError("invalid_diff", f"{self.tensor}: part {name} is not in its shard")
        return info

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def read(self, name: str, start: int, length: int) -> memoryview:
        info = self._entry(name)
        if start < 0 or start + length > info.nbytes:
            raise GraftError("invalid_diff", f"{self.tensor}: part {name} is shorter than its encoding says")
        if self.cache is not None and info.nbytes <= SMALL_PART:
            def load() -> bytes:
                self.bytes_read += info.nbytes
                return bytes(self.store.read_range(info.file, info.start, info.nbytes))

            return memoryview(self.cache.get((self.tensor, name), load))[start:start + length]
        self.bytes_read += length
        return memoryview(self.store.read_range(info.file, info.start + start, length))


class ArtifactStore(Store):
    """The artifact's files as they are (its side files, shards and manifest), and its virtual ones: the decoded
    delta of a tensor (`delta/<tensor>`, the compute dtype) and its stored rows (`rows/<tensor>`)."""

    def __init__(self, inner: Store, manifest: DiffManifest, entries: dict[str, TensorInfo]) -> None:
        self.inner, self.manifest, self.entries = inner, manifest, entries
        self.location, self.revision = inner.location, inner.revision
        self._closed = False
        self._lock = threading.Lock()
        self.cache = _PartCache()
        self.served = 0  # bytes of virtual files handed to the reader (decoded deltas, rows)
        self.stored_read = 0  # bytes read of the artifact itself to serve them
        self._structured: set[str] = set()  # delta/ files whose reads keep the delta's structure
        self._patches: dict[str, list[list]] = {}  # file -> [[patch, elements taken], ...], read ahead

    def keep_structure(self, files: set[str]) -> None:
        """From now on, a read of one of these delta/ files (those the plain kernel applies) leaves the read
        buffer as it is and keeps the delta in its encoding's structure, for take_patch (compute/patches.py);
        an encoding without one (exact, int8, sign, a tensor stored exact) still decodes into the buffer.
        An empty set ends it and drops what was not taken."""
        with self._lock:
            self._structured = set(files)
            self._patches.clear()

    def take_patch(self, file: str, start: int, stop: int) -> Patch | None:
        """The structured delta of bytes [start, stop) of `file` that a read kept; None where the read decoded
        into its buffer. Taken once: a patch is dropped when all its elements have been."""
        with self._lock:
            kept = self._patches.get(file, [])
            for item in kept:
                patch, size = item[0], self._itemsize(file)
                lo, hi = start // size - patch.start, stop // size - patch.start
                if lo >= 0 and hi <= patch.count:
                    item[1] += hi - lo
                    if item[1] >= patch.count:
                        kept.remove(item)
                    return patch if (lo, hi) == (0, patch.count) else patch.slice(lo, hi)
        return None

    def _itemsize(self, file: str) -> int:
        return itemsize(self.manifest.tensors[file[len(DELTA_FILE):]].compute)

    def count(self, served: int, stored: int) -> None:
        with self._lock:
            self.served += served
            self.stored_read += stored

    def io_adjustment(self) -> int:
        """What a pass's byte count, which counts the decoded bytes it was handed, must add to count what was
        read of the artifact instead."""
        return self.stored_read - self.served

    def list_files(self) -> dict[str, int]:
        return dict(self.inner.files)

    def fingerprint(self, name: str) -> dict:
        return self.inner.fingerprint(name)

    def path(self, name: str) -> str:
        return self.inner.path(name)

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        if name.startswith(DELTA_FILE):
            return self._decode(name[len(DELTA_FILE):], start, view)
        if name.startswith(ROWS_FILE):
            tensor = name[len(ROWS_FILE):]
            info = self.entries[entry_name(tensor, "rows")]
            if start < 0 or start + len(view) > info.nbytes:
                raise GraftError("invalid_diff", f"{tensor}: the stored rows are shorter than the manifest says")
            self.count(len(view), len(view))
            return self.inner.read_into(info.file, info.start + start, view)
        return self.inner.read_into(name, start, view)

    def _decode(self, tensor: str, start: int, view: memoryview) -> None:
        entry = self.manifest.tensors[tensor]
        dtype = DTYPES[entry.compute]
        size = dtype.itemsize
        patching = getattr(ENCODINGS[entry.stored], "patch", None)
        if patching is not None and DELTA_FILE + tensor in self._structured:
            reader = _EntryReader(self.inner, self.entries, tensor, self.cache)
            patch = patching(reader, entry.meta, tuple(entry.shape), start // size, len(view) // size, dtype)
            if patch is not None:
                with self._lock:
                    self._patches.setdefault(DELTA_FILE + tensor, []).append([patch, 0])
                self.count(len(view), reader.bytes_read)
                return
        out = torch.frombuffer(view, dtype=dtype, count=len(view) // size) if len(view) else torch.empty(0, dtype=dtype)
        reader = _EntryReader(self.inner, self.entries, tensor, self.cache)
        ENCODINGS[entry.stored].decode_into(reader, entry.meta, tuple(entry.shape), start // size, out)
        self.count(len(view), reader.bytes_read)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.inner.close()


class Artifact:
    """A resolved diff artifact: StoredDiff (storage/model.py) for the planner, and the two stand-in models."""

    def __init__(self, uri: str, store: ArtifactStore) -> None:
        self.uri, self.store, self.manifest = uri, store, store.manifest
        self.changed_buffers = set(self.manifest.changed_buffers)

    def delta_info(self, name: str) -> TensorInfo | None:
        entry = self.manifest.tensors.get(name)
        if entry is None:
            return None
        nbytes = math.prod(entry.shape) * itemsize(entry.compute)
        return TensorInfo(name, DELTA_FILE + name, entry.compute, tuple(entry.shape), 0, nbytes)

    def rows_info(self, name: str) -> tuple[TensorInfo, int] | None:
        entry = self.manifest.tensors.get(name)
        if entry is None or entry.rows is None:
            return None
        rows = entry.rows
        row = math.prod(entry.shape[1:])
        size = itemsize(rows.dtype)
        start = -rows.first_row * row * size  # so that the fine-tune's element e is at byte e * size
        shape = (rows.first_row + rows.rows, *entry.shape[1:])
        return TensorInfo(name, ROWS_FILE + name, rows.dtype, shape, start, start + math.prod(shape) * size), \
            rows.first_row

    def model(self, side: str) -> ResolvedModel:
        recorded = self.manifest.sources[side]
        tensors = {n: TensorInfo(n, t.file, t.dtype, tuple(t.shape), t.start, t.end)
                   for n, t in recorded.tensors.items()}
        kind = _RecordedBase if side == "source_base" else ResolvedModel
        return kind(side, self.store, dict(recorded.config), tensors, list(recorded.weight_files), artifact=self)


class _RecordedBase(ResolvedModel):
    """The source base's stand-in: its tokenizer files are the artifact's BASE_PREFIX copies (the unprefixed ones
    are the fine-tune's, which the output takes)."""

    def tokenizer_files(self) -> list[str]:
        return [name for name in TOKENIZER_FILES if self.store.exists(BASE_PREFIX + name)]

    def side_file(self, name: str) -> bytes:
        return self.store.read_bytes(BASE_PREFIX + name if name in TOKENIZER_FILES else name)


def _check_entries(manifest: DiffManifest, entries: dict[str, TensorInfo], uri: str) -> None:
    for name, entry in manifest.tensors.items():
        if entry.stored not in ENCODINGS:
            raise _invalid(uri, f"{name}: unknown encoding {entry.stored!r}")
        wanted = [*entry.parts, *(["rows"] if entry.rows is not None else [])]
        missing = [p for p in wanted if entry_name(name, p) not in entries]
        if missing:
            raise _invalid(uri, f"{name}: part(s) {', '.join(missing)} missing from its shard")
        if entry.rows is not None:
            need = entry.rows.rows * math.prod(entry.shape[1:]) * itemsize(entry.rows.dtype)
            if entries[entry_name(name, "rows")].nbytes != need:
                raise _invalid(uri, f"{name}: its stored rows are not the {entry.rows.rows} rows the manifest says")


def open_artifact(uri: str, location: Location, *, endpoint_url: str | None = None, max_header_bytes: int = 100 << 20,
                  reads: RemoteReads | None = None, allowed_roots: list[str] | None = None,
                  denied_roots: list[str] | None = None, retry: StorageRetry | None = None,
                  digest_cache=None, shard_cache: ShardCache | None = None) -> Artifact:
    """The artifact at `location`, checked (manifest, shard sizes and sha256, every part present): GraftError
    invalid_diff otherwise, before anything is planned or written. `shard_cache`: remote shards are read from
    the verified copies it keeps (shard_cache.py)."""
    inner = open_store(location, endpoint_url, reads=reads, allowed_roots=allowed_roots, denied_roots=denied_roots,
                       retry=retry)
    try:
        manifest = read_manifest(inner, uri)
        fds = verify_shards(inner, manifest, uri, digest_cache, shard_cache)
        if fds:
            inner = KeptShards(inner, fds)  # closes them with itself
        entries: dict[str, TensorInfo] = {}
        for shard in manifest.shards:
            found, _meta = _read_header(inner, shard.path, "diff", max_header_bytes)
            entries.update(found)
        _check_entries(manifest, entries, uri)
        return Artifact(uri, ArtifactStore(inner, manifest, entries))
    except BaseException:
        inner.close()
        raise


def read_sketch(store: Store, tensor: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """A tensor's sketches of the source base and of the delta (float64) and ||d||^2, from the artifact behind
    `store` (an ArtifactStore); None when it holds none."""
    if not isinstance(store, ArtifactStore):
        return None
    entry = store.manifest.tensors.get(tensor)
    if entry is None or not entry.sketch:
        return None
    reader = _EntryReader(store.inner, store.entries, tensor)
    sketches = []
    for part in ("sketch.base", "sketch.delta"):
        data = reader.read(part, 0, reader.nbytes(part))
        sketches.append(torch.frombuffer(bytearray(data), dtype=torch.float64))
    return sketches[0], sketches[1], float(entry.norms.get("delta_sq", 0.0))


def recorded_model(model: ResolvedModel, side: str, *, endpoint_url: str | None = None,
                   max_header_bytes: int = 100 << 20, reads: RemoteReads | None = None,
                   allowed_roots: list[str] | None = None, denied_roots: list[str] | None = None,
                   retry: StorageRetry | None = None) -> ResolvedModel | None:
    """For a diff artifact's stand-in, the model it was extracted from (`side`), resolved from the URI the artifact
    records: what runs a model (an evaluation, the function-level probe) needs its weights, which the artifact
    does not hold. None for a real model; GraftError naming the recorded URI when it cannot be read."""
    if model.artifact is None:
        return None
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    uri = model.artifact.manifest.sources[side].uri
    try:
        return resolve_model(side, parse_uri(uri, field=side), endpoint_url=endpoint_url,
                             max_header_bytes=max_header_bytes, reads=reads, allowed_roots=allowed_roots,
                             denied_roots=denied_roots, retry=retry)
    except GraftError as err:
        raise GraftError(err.code, f"running the {side.replace('_', ' ')} needs its weights, which the diff "
                         f"artifact does not hold, and the model it was extracted from ({uri}) cannot be read: "
                         f"{err.message}") from None
