"""Resolving a model reference into what the planner needs: its config and every tensor's place,
read from safetensors headers alone (no tensor data)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from worker.engine.errors import GraftError
from worker.engine.storage.faults import StorageRetry
from worker.engine.storage.lanes import RemoteReads
from worker.engine.storage.safetensors_format import TensorInfo, header_length, load_json, parse_header
from worker.engine.storage.stores import Store, open_store
from worker.engine.storage.uris import Location

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
HEADER_PROBE = 1 << 20  # one request fetches the length word and, almost always, the whole header
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class StoredDiff(Protocol):
    """What planning asks of a diff artifact (worker/engine/diffs/artifact.py implements it)."""

    uri: str
    changed_buffers: set[str]  # non-float tensors the fine-tune changed (the target's are kept, as ever)

    def delta_info(self, name: str) -> TensorInfo | None:
        """The decoded delta of a tensor (its rows the sources share), as a virtual tensor of the artifact."""

    def rows_info(self, name: str) -> tuple[TensorInfo, int] | None:
        """The fine-tune's rows past its base's (its added vocabulary) as a virtual tensor whose element indices
        are the fine-tune's own, and the first row it holds; None when it holds none."""


@dataclass
class ResolvedModel:
    role: str
    store: Store
    config: dict
    tensors: dict[str, TensorInfo]
    weight_files: list[str]
    metadata: dict[str, dict] = field(default_factory=dict)
    side_files: dict[str, bytes] = field(default_factory=dict)  # fetched while resolving (see resolve_model)
    # A side of a diff artifact's source pair: its recorded headers, and the artifact (worker/engine/diffs) that
    # serves the decoded delta and the fine-tune's extra rows in place of the two models' tensors.
    artifact: StoredDiff | None = None

    @property
    def uri(self) -> str:
        return str(self.store.location)

    @property
    def vocab_size(self) -> int | None:
        value = self.config.get("vocab_size")
        if value is None and isinstance(self.config.get("text_config"), dict):
            value = self.config["text_config"].get("vocab_size")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def tokenizer_files(self) -> list[str]:
        return [name for name in TOKENIZER_FILES if self.store.exists(name)]

    def side_file(self, name: str) -> bytes:
        """A small file of the model: as fetched while resolving, else read now."""
        data = self.side_files.get(name)
        return data if data is not None else self.store.read_bytes(name)


def _read_json(store: Store, name: str, role: str, *, unique_keys: bool = False) -> dict:
    value = load_json(store.read_bytes(name), f"{role}: {store.location}/{name}", "invalid_input",
                      unique_keys=unique_keys)
    if not isinstance(value, dict):
        raise GraftError("invalid_input", f"{role}: {store.location}/{name} is not a JSON object")
    return value


def _read_header(store: Store, name: str, role: str, cap: int) -> tuple[dict[str, TensorInfo], dict]:
    where = f"{role}: {store.location}/{name}"
    size = store.size(name)
    probe = bytes(store.read_range(name, 0, min(size, HEADER_PROBE)))
    n = header_length(probe, where, cap)
    if 8 + n > size:
        raise GraftError("invalid_safetensors", f"{where}: header runs past the end of the file (truncated?)")
    raw = probe[8:8 + n]
    if len(raw) < n:
        raw += bytes(store.read_range(name, len(probe), 8 + n - len(probe)))
    return parse_header(raw, where=where, file=name, file_size=size)


def resolve_model(role: str, location: Location, *, endpoint_url: str | None = None,
                  max_header_bytes: int = 100 << 20, reads: RemoteReads | None = None,
                  allowed_roots: list[str] | None = None, denied_roots: list[str] | None = None,
                  require_model_type: bool = False, side_files: tuple[str, ...] = (),
                  retry: StorageRetry | None = None) -> ResolvedModel:
    """`require_model_type`: for the model whose config.json the output inherits (the target), which
    transformers cannot load without a model_type. `side_files`: small files the output will copy
    (tokenizer, generation config), fetched with config.json and the index, all at once, those that exist.
    `reads`, `allowed_roots`/`denied_roots`: see open_store."""
    store = open_store(location, endpoint_url, reads=reads, allowed_roots=allowed_roots,
                       denied_roots=denied_roots, retry=retry)
    try:
        return _resolve(role, location, store, max_header_bytes, require_model_type, side_files)
    except BaseException:
        store.close()
        raise


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 100 else repr(name[:100]) + "..."


def _index_files(index: dict, store: Store, role: str, location: Location) -> tuple[dict[str, str], list[str]]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise GraftError("invalid_input", f"{role}: {location}/{INDEX_FILE} has no weight_map")
    for tname, fname in weight_map.items():
        if not isinstance(fname, str):
            raise GraftError("invalid_input", f"{role}: {location}/{INDEX_FILE} places {_shown(tname)} in a "
                             f"{type(fname).__name__}, not a file name")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if "/" in name or not store.exists(name):
            raise GraftError("input_not_found",
                             f"{role}: {location}: shard {_shown(name)} named by the index is missing")
    return weight_map, files


def _small_files(store: Store, role: str, side_files: tuple[str, ...]) -> tuple[Future, Future | None,
                                                                                 dict[str, Future]]:
    """config.json, the index (None without one) and the side files that exist, fetched at once: each is a
    round trip to a remote store, and none needs another's answer. Done when this returns."""
    side = [name for name in dict.fromkeys(side_files) if store.exists(name)]
    with ThreadPoolExecutor(max_workers=min(8, 2 + len(side)), thread_name_prefix="graft-resolve") as pool:
        config = pool.submit(_read_json, store, "config.json", role)
        # Duplicate keys refused: which shard a repeated tensor name points at would be the parser's choice.
        index = (pool.submit(_read_json, store, INDEX_FILE, role, unique_keys=True)
                 if store.exists(INDEX_FILE) else None)
        fetched = {name: pool.submit(store.read_bytes, name) for name in side}
    return config, index, fetched


def _resolve(role: str, location: Location, store: Store, max_header_bytes: int,
             require_model_type: bool, side_files: tuple[str, ...]) -> ResolvedModel:
    if not store.exists("config.json"):
        raise GraftError("input_not_found", f"{role}: {location} has no config.json")
    config_read, index_read, side_read = _small_files(store, role, side_files)
    config = config_read.result()
    if require_model_type and not isinstance(config.get("model_type"), str):
        raise GraftError("invalid_input", f"{role}: {location}/config.json has no model_type string; the output "
                         "takes this config, and transformers cannot load a model without one")
    weight_map: dict[str, str] | None
    if index_read is not None:
        weight_map, files = _index_files(index_read.result(), store, role, location)
    elif store.exists(SINGLE_FILE):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise GraftError("input_not_found", f"{role}: {location} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        headers = list(pool.map(lambda f: _read_header(store, f, role, max_header_bytes), files))
    tensors: dict[str, TensorInfo] = {}
    metadata = {}
    for name, (file_tensors, meta) in zip(files, headers, strict=True):
        metadata[name] = meta
        for tname, info in sorted(file_tensors.items(), key=lambda kv: kv[1].start):
            if tname in tensors:
                raise GraftError("invalid_input", f"{role}: tensor {_shown(tname)} appears in two shards")
            tensors[tname] = info
    if weight_map is not None:
        for tname, fname in weight_map.items():
            info = tensors.get(tname)
            if info is None or info.file != fname:
                raise GraftError("invalid_input",
                                 f"{role}: index places {_shown(tname)} in {_shown(fname)}, which lacks it")
        unlisted = [tname for tname in tensors if tname not in weight_map]
        if unlisted:
            # Loaders disagree on such a tensor (some read whole shards, some only what the index names).
            raise GraftError("invalid_input", f"{role}: {location}/{INDEX_FILE} omits {len(unlisted)} tensor(s) "
                             f"its shards hold: " + ", ".join(_shown(t) for t in unlisted[:5]))
    side = {name: future.result() for name, future in side_read.items()}
    return ResolvedModel(role, store, config, tensors, files, metadata, side)
