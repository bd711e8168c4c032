"""Exporting a transfer as a LoRA adapter: the delta of a source pair (or of a diff artifact) factored per
module by the `lowrank` encoding's streaming randomized SVD, checked against the target it is meant for, and
written as PEFT writes an adapter (`adapter_config.json`, `adapter_model.safetensors`) with `lora-manifest.json`
committed last.

Each module's delta A (as stored: Linear [out, in], GPT-2's Conv1D [in, out]; lora_layouts.py) is fed to the
encoder in row chunks, one pass after the other (3 + 2 x power_iterations reads of that one matrix; never the
model): U (singular values folded in) and V come back, and lora_B = alpha U, lora_A = V (Conv1D: lora_A = U^T,
lora_B = alpha V^T, fan_in_fan_out). `lora_alpha` is written equal to `r`, so PEFT's and vLLM's scaling
(lora_alpha / r) is 1 and the transfer strength `alpha` is in lora_B. Every module's factors are padded with zero
rows/columns to the adapter's one rank (exact: a zero rank-one term adds nothing), so no rank_pattern is needed.

Streamed writing: with `rank`, the adapter's rank and every tensor's shape follow from the shapes, so the
safetensors header is written first and each module's bytes as it is factored (memory: one module). With
`energy` the rank is known only once every module is factored: each module's factors go to a scratch file as
they come, and are copied (padded) behind the header after the last one (memory: still one module).

Profiles: `vllm` writes LoRA on linear modules only (no modules_to_save, no bias, no DoRA) at a rank vLLM
accepts (the asked rank rounded up to VLLM_RANKS); `peft` also carries, through `modules_to_save`, every other
module whose tensors the target has with the same shape (norms, lm_head, position embeddings) as
target + alpha x delta (never the fine-tune's values: those belong to the old base), the biases of LoRA modules
as `lora_B.bias` (`lora_bias: true`), and the input embedding's changed rows (and the fine-tune's added rows
where the target has those rows) through `trainable_token_indices`, which also serves tied embeddings. What a
profile leaves out is listed in the manifest with its share of ||delta||^2."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from worker.engine.config import EngineSettings
from worker.engine.diffs.encoding_params import MAX_RANK, LowRankParams
from worker.engine.diffs.encodings.common import as_bytes
from worker.engine.diffs.encodings.lowrank import LowRankEncoder
from worker.engine.diffs.encodings.memory_parts import MemoryParts
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.pipeline.lora_layouts import Layout, layout_of
from worker.engine.pipeline.lora_request import (  # noqa: F401 (re-exported)
    DEFAULT_MODULES,
    VLLM_RANKS,
    LoraExport,
    LoraExportRequest,
    vllm_rank,
)
from worker.engine.pipeline.manifest import ENGINE_VERSION, dumps
from worker.engine.pipeline.publish import publishing, storage_retry
from worker.engine.pipeline.resolve import pick_device, remote_reads
from worker.engine.planning.patterns import compile_pattern
from worker.engine.storage.input_hashes import InputHasher
from worker.engine.storage.model import ResolvedModel, resolve_model
from worker.engine.storage.safetensors_format import DTYPES, build_header
from worker.engine.storage.uris import parse_uri

LORA_MANIFEST = "lora-manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHUNK = 1 << 20  # elements read at a time
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
@dataclass
class LoraResult:
    output_uri: str
    manifest_uri: str
    manifest: dict


class DeltaSource:
    """The delta per tensor, read in element ranges in the compute dtype (float32; float64 where a side is):
    from a source pair (f - s, as the graft forms it) or from a diff artifact (decoded)."""

    def __init__(self, models: dict[str, ResolvedModel], artifact=None) -> None:
        self.models, self.artifact = models, artifact

    def shape(self, name: str) -> tuple[int, ...] | None:
        if self.artifact is not None:
            entry = self.artifact.manifest.tensors.get(name)
            return tuple(entry.shape) if entry is not None else None
        s, f = (self.models[r].tensors.get(name) for r in ("source_base", "source_finetuned"))
        if s is None or f is None or not DTYPES[s.dtype].is_floating_point or not DTYPES[f.dtype].is_floating_point:
            return None
        if s.shape[1:] != f.shape[1:] or not s.shape:
            return None
        return (min(s.shape[0], f.shape[0]), *s.shape[1:])  # the rows both share, as the graft transfers them

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        if self.artifact is not None:
            info = self.artifact.delta_info(name)
            return _read(self.artifact.store, info, start, count, DTYPES[info.dtype])
        s, f = (self.models[r].tensors[name] for r in ("source_base", "source_finetuned"))
        compute = torch.float64 if torch.float64 in (DTYPES[s.dtype], DTYPES[f.dtype]) else torch.float32
        d = _read(self.models["source_finetuned"].store, f, start, count, compute)
        return d.sub_(_read(self.models["source_base"].store, s, start, count, compute))

    def chunks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        total, row = math.prod(shape), math.prod(shape[1:]) or 1
        step = max(1, CHUNK // row) * row
        for start in range(0, total, step):
            yield start, self.read(name, start, min(step, total - start))


def _read(store, info, start: int, count: int, compute: torch.dtype) -> torch.Tensor:
    dtype = DTYPES[info.dtype]
    buffer = bytearray(count * dtype.itemsize)
    if count:
        store.read_into(info.file, info.start + start * dtype.itemsize, memoryview(buffer))
    return torch.frombuffer(buffer, dtype=dtype).to(compute) if count else torch.empty(0, dtype=compute)




@dataclass
class _Module:
    name: str  # the module's name (the tensor's without ".weight")
    shape: tuple[int, int]  # as stored
    transposed: bool = False  # Conv1D: stored [in, out]
    bias: str | None = None  # the bias tensor carried as lora_B.bias (peft)
    rank: int = 0
    entry: dict = field(default_factory=dict)

    @property
    def features(self) -> tuple[int, int]:
        """(out, in), as lora_B and lora_A see them."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


@dataclass
class _Tokens:
    """The input embedding's rows carried by trainable_token_indices: `changed` (target + alpha x delta) and
    `added` (the fine-tune's rows past the source base's, as the graft's `extend` keeps them)."""

    name: str
    changed: list[int]
    added: list[int]
    width: int
    dtype: str


@dataclass
class _Plan:
    layout: Layout
    modules: list[_Module]
    saved: list[str] = field(default_factory=list)  # tensors of modules_to_save
    keep: list[str] = field(default_factory=list)  # modules_to_save
    tokens: _Tokens | None = None
    left: dict = field(default_factory=dict)
    carried_sq: float = 0.0  # ||delta||^2 of what is carried whole (biases, modules_to_save, token rows)

    @property
    def lora_bias(self) -> bool:
        return any(m.bias for m in self.modules)


def _names(source: DeltaSource) -> list[str]:
    return list(source.artifact.manifest.tensors if source.artifact is not None
                else source.models["source_base"].tensors)


def _select(spec: LoraExport, source: DeltaSource, target: ResolvedModel, layout: Layout
            ) -> tuple[list[_Module], list[str]]:
    """The LoRA modules (2-D `.weight` tensors the layout can factor whose module name the regex finds) and
    every other delta tensor. A LoRA module whose delta does not have the target's shape is refused: the adapter
    would not load."""
    pattern, modules, rest = compile_pattern(spec.modules, "modules"), [], []
    for name in _names(source):
        shape = source.shape(name)
        if shape is None:
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and len(shape) == 2 and pattern.search(module) and layout.factorable(module):
            info = target.tensors.get(name)
            if info is None or tuple(info.shape) != shape:
                found = list(info.shape) if info is not None else None
                raise GraftError("shape_mismatch", f"{name}: the delta is {list(shape)}, the target's is {found}: "
                                 "an adapter on this target cannot hold it", {"tensor": name})
            modules.append(_Module(module, shape, layout.transposed(module)))
        else:
            rest.append(name)
    if not modules:
        raise GraftError("no_modules", f"no 2-D linear weight matches --modules {spec.modules!r}")
    return modules, rest


def _carriable(source: DeltaSource, target: ResolvedModel, name: str) -> bool:
    info = target.tensors.get(name)
    return info is not None and tuple(info.shape) == source.shape(name) and DTYPES[info.dtype].is_floating_point


def _plan(spec: LoraExport, source: DeltaSource, target: ResolvedModel) -> _Plan:
    """What goes where, from the shapes (and, for the embedding's rows, one read of its delta)."""
    layout = layout_of(target.config)
    modules, rest = _select(spec, source, target, layout)
    plan, by_name, groups = _Plan(layout, modules), {m.name: m for m in modules}, {}
    for name in rest:
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    peft = spec.profile == "peft"
    for module, names in groups.items():
        if peft and module in by_name and names == [module + ".bias"] and _carriable(source, target, names[0]):
            by_name[module].bias = names[0]
        elif peft and module.rsplit(".", 1)[-1] == layout.embedding and names == [module + ".weight"] \
                and _tokens(plan, spec, source, target, names[0]):
            continue
        elif peft and module not in by_name and all(_carriable(source, target, n) for n in names):
            plan.saved.extend(names)
            plan.keep.append(module)
        else:
            for n in names:
                plan.left[n] = {"reason": _reason(spec, source, target, n, module in by_name),
                                "delta_sq": _delta_sq(source, n)}
    plan.carried_sq = sum(_delta_sq(source, n) for n in plan.saved) + \
        sum(_delta_sq(source, m.bias) for m in modules if m.bias)
    plan.keep.sort()
    return plan


def _tokens(plan: _Plan, spec: LoraExport, source: DeltaSource, target: ResolvedModel, name: str) -> bool:
    """Plan the embedding's rows for trainable_token_indices; False where the target's embedding cannot take
    them (another width, fewer rows than the delta's)."""
    info, shape = target.tensors.get(name), source.shape(name)
    if info is None or tuple(info.shape[1:]) != shape[1:] or info.shape[0] < shape[0] \
            or not DTYPES[info.dtype].is_floating_point:
        return False
    changed, width, sq = [], math.prod(shape[1:]), 0.0
    for start, chunk in source.chunks(name, shape):
        rows = chunk.view(-1, width)
        sq += float(rows.double().square().sum())
        changed.extend(int(i) + start // width for i in torch.nonzero(rows.ne(0).any(dim=1)).flatten())
    added = []
    if source.artifact is None:  # the fine-tune's rows past the shared ones: the graft's `extend` keeps them
        f = source.models["source_finetuned"].tensors[name]
        added = list(range(shape[0], min(f.shape[0], info.shape[0])))
        if f.shape[0] > info.shape[0]:
            start = info.shape[0] * width
            plan.left[f"{name}[{info.shape[0]}:{f.shape[0]}]"] = {
                "reason": "the fine-tune's added vocabulary rows past the target's vocabulary",
                "delta_sq": _sum_sq(_read(source.models["source_finetuned"].store, f, start,
                                          (f.shape[0] - info.shape[0]) * width, torch.float64))}
        if added:
            sq += _sum_sq(_read(source.models["source_finetuned"].store, f, shape[0] * width, len(added) * width,
                                torch.float64))
    plan.tokens = _Tokens(name, changed, added, width, info.dtype)
    plan.carried_sq += sq
    return True


def _sum_sq(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


def _delta_sq(source: DeltaSource, name: str) -> float:
    return sum(_sum_sq(c) for _, c in source.chunks(name, source.shape(name)))


def _reason(spec: LoraExport, source: DeltaSource, target: ResolvedModel, name: str, bias: bool) -> str:
    info = target.tensors.get(name)
    if info is None:
        return "not in the target"
    if tuple(info.shape) != source.shape(name):
        return f"the target's shape {list(info.shape)} differs from the delta's {list(source.shape(name))}"
    if spec.profile == "vllm":
        return "bias: vLLM loads no LoRA bias" if bias else "not a linear module: vLLM loads no modules_to_save"
    return "not a tensor PEFT's layout can carry here"


def _factor(source: DeltaSource, module: _Module, spec: LoraExport, cap: int, device: torch.device,
            should_cancel: Callable[[], bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's U (m x r, singular values folded in) and V (r x n), the stored matrix's, streamed pass by
    pass."""
    m, n = module.shape
    params = LowRankParams(encoding="lowrank", rank=spec.rank, energy=spec.energy,
                           power_iterations=spec.power_iterations, seed=spec.seed)
    parts = MemoryParts()
    compute = source.read(module.name + ".weight", 0, 1).dtype
    encoder = LowRankEncoder(module.shape, compute, params, min(cap, m, n), parts, device=device)
    for index in range(encoder.passes):
        if should_cancel is not None and should_cancel():
            raise GraftCancelled()
        for start, chunk in source.chunks(module.name + ".weight", module.shape):
            encoder.feed(index, start, chunk)
        encoder.end_pass(index)
    info = encoder.finish()
    r = info.meta["rank"]
    module.rank = r
    module.entry = {"shape": list(module.shape), "rank": r, "retained_energy": info.extra["retained_energy"],
                    "rel_frobenius": info.rel_frobenius, "max_abs": info.max_abs, "delta_sq": encoder.norm2}
    if module.transposed:
        module.entry["transposed"] = True  # Conv1D: lora_A = U^T, lora_B = alpha V^T
    return parts.tensor("U").view(m, r), parts.tensor("V").view(r, n)


def _lora_pair(u: torch.Tensor, v: torch.Tensor, module: _Module, r: int, alpha: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r], zero rank terms up to the adapter's rank r (B A is unchanged)."""
    a, b = (u.T, v.T) if module.transposed else (v, u)
    extra = r - a.shape[0]
    a = torch.nn.functional.pad(a, (0, 0, 0, extra))
    b = torch.nn.functional.pad(b * alpha, (0, extra))
    return a.contiguous(), b.contiguous()


def _read_carried(source: DeltaSource, target: ResolvedModel, name: str, start: int, count: int, alpha: float
                  ) -> torch.Tensor:
    """Elements [start, start + count) of target + alpha x delta, rounded once to the target's dtype (as the
    graft writes it)."""
    info = target.tensors[name]
    delta = source.read(name, start, count)
    return _read(target.store, info, start, count, delta.dtype).add_(delta, alpha=alpha).to(DTYPES[info.dtype])


class _Weights:
    """The adapter's safetensors file: header from shapes, then each entry's bytes in order, through one writer
    of the sink (memory: what one entry's producer holds)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, tuple[int, ...]]] = []
        self.producers: list[Callable[[Callable], None]] = []

    def add(self, entries: list[tuple[str, str, tuple[int, ...]]], producer: Callable[[Callable], None]) -> None:
        self.entries.extend(entries)
        self.producers.append(producer)

    def write(self, sink):
        header, offsets = build_header(self.entries)
        total = len(header) + (offsets[-1][1] if offsets else 0)
        writer = sink.open(ADAPTER_WEIGHTS, total)
        try:
            writer.write(header)
            for producer in self.producers:
                producer(lambda t: writer.write(as_bytes(t.contiguous().cpu())))
            if writer.size != total:
                raise GraftError("internal_error", f"{ADAPTER_WEIGHTS}: {writer.size} bytes written, the header "
                                 f"says {total}")
            return writer.close()
        except BaseException:
            writer.abort()
            raise


def _adapter_rank(spec: LoraExport, modules: list[_Module]) -> tuple[int, int]:
    """(the factoring cap, the adapter's rank; 0 when it comes from the factors: `energy`)."""
    cap = spec.rank if spec.rank is not None else min(MAX_RANK, 512 if spec.profile == "vllm" else MAX_RANK)
    if spec.profile == "vllm" and spec.rank is not None:
        cap = vllm_rank(spec.rank)  # the rank the adapter has: factor at it (more of the delta, same size)
    if spec.rank is None:
        return cap, 0
    r = max(1, max(min(cap, *m.shape) for m in modules))
    return cap, vllm_rank(r) if spec.profile == "vllm" else r


@dataclass
class _Run:
    """What the writing of one export shares."""

    spec: LoraExport
    source: DeltaSource
    target: ResolvedModel
    plan: _Plan
    device: torch.device
    progress: Callable[[dict], None] | None
    should_cancel: Callable[[], bool] | None
    scratch: str | None = None  # where `energy` spools the factors (the system's temp directory if None)
    done: int = 0

    def factor(self, module: _Module, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = _factor(self.source, module, self.spec, cap, self.device, self.should_cancel)
        self.done += 1
        if self.progress is not None:
            self.progress({"modules_done": self.done, "modules_total": len(self.plan.modules)})
        return u, v


FACTOR_DTYPES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16),
                 "float16": ("F16", torch.float16)}


def _module_entries(module: _Module, r: int, bias: bool, factor_dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    out, into = module.features
    key, stored = f"base_model.model.{module.name}", FACTOR_DTYPES[factor_dtype][0]
    entries = [(f"{key}.lora_A.weight", stored, (r, into)), (f"{key}.lora_B.weight", stored, (out, r))]
    return entries + ([(f"{key}.lora_B.bias", stored, (out,))] if bias else [])


def _module_producer(run: _Run, module: _Module, r: int, factors: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    stored = FACTOR_DTYPES[run.spec.factor_dtype][1]

    def produce(write: Callable) -> None:
        a, b = _lora_pair(*factors(), module, r, run.spec.alpha)
        write(a.to(stored))  # float32 factors rounded once
        write(b.to(stored))
        del a, b
        if run.plan.lora_bias:
            write(_bias(run, module).to(stored))

    return produce


def _bias(run: _Run, module: _Module) -> torch.Tensor:
    """lora_B.bias: the bias's change as the graft's rounding leaves it; zero where the module's has none."""
    if module.bias is None:
        return torch.zeros(module.features[0])
    info = run.target.tensors[module.bias]
    grafted = _read_carried(run.source, run.target, module.bias, 0, info.shape[0], run.spec.alpha)
    return grafted.float() - _read(run.target.store, info, 0, info.shape[0], torch.float32)


def _saved_producer(run: _Run, name: str):
    def produce(write: Callable) -> None:
        shape = run.source.shape(name)
        total, row = math.prod(shape), math.prod(shape[1:]) or 1
        step = max(1, CHUNK // row) * row
        for start in range(0, total, step):
            write(_read_carried(run.source, run.target, name, start, min(step, total - start), run.spec.alpha))

    return produce


def _tokens_producer(run: _Run, tokens: _Tokens):
    """The rows in index order: changed ones as target + alpha x delta, added ones as the fine-tune's."""
    def produce(write: Callable) -> None:
        rows, width = max(1, CHUNK // tokens.width), tokens.width
        for first, count in _runs(tokens.changed, rows):
            write(_read_carried(run.source, run.target, tokens.name, first * width, count * width, run.spec.alpha))
        if tokens.added:
            f = run.source.models["source_finetuned"].tensors[tokens.name]
            for first, count in _runs(tokens.added, rows):
                write(_read(run.source.models["source_finetuned"].store, f, first * width, count * width,
                            torch.float32).to(DTYPES[tokens.dtype]))

    return produce


def _runs(indices: list[int], cap: int) -> Iterator[tuple[int, int]]:
    """Sorted indices as (first, count) runs of consecutive ones, at most cap long."""
    first = count = 0
    for i in indices:
        if count and i == first + count and count < cap:
            count += 1
            continue
        if count:
            yield first, count
        first, count = i, 1
    if count:
        yield first, count


def _rest_entries(run: _Run, weights: _Weights) -> None:
    for name in run.plan.saved:
        info = run.target.tensors[name]
        weights.add([(f"base_model.model.{name}", info.dtype, tuple(info.shape))], _saved_producer(run, name))
    tokens = run.plan.tokens
    if tokens is not None and (tokens.changed or tokens.added):
        module = tokens.name.removesuffix(".weight")
        shape = (len(tokens.changed) + len(tokens.added), tokens.width)
        weights.add([(f"base_model.model.{module}.token_adapter.trainable_tokens_delta", tokens.dtype, shape)],
                    _tokens_producer(run, tokens))


def _write_adapter(run: _Run, sink) -> tuple[int, list]:
    """The adapter's two files; returns (rank, their records). With `rank`, each module is factored while its
    bytes are written; with `energy`, factored first into scratch files (its rank is the largest one)."""
    modules, spec = run.plan.modules, run.spec
    cap, r = _adapter_rank(spec, modules)
    with tempfile.TemporaryDirectory(prefix="graft-lora-", dir=run.scratch) as scratch:
        if r == 0:
            spooled = {}
            for i, module in enumerate(modules):
                spooled[module.name] = os.path.join(scratch, f"{i}.pt")
                torch.save(run.factor(module, cap), spooled[module.name])
            r = max(1, max(m.rank for m in modules))
            r = vllm_rank(r) if spec.profile == "vllm" else r

            def factors(module: _Module) -> Callable:
                return lambda: torch.load(spooled[module.name], weights_only=True)
        else:
            def factors(module: _Module) -> Callable:
                return lambda: run.factor(module, cap)
        weights = _Weights()
        for module in modules:
            entries = _module_entries(module, r, run.plan.lora_bias, spec.factor_dtype)
            weights.add(entries, _module_producer(run, module, r, factors(module)))
        _rest_entries(run, weights)
        config = adapter_config(spec, run.plan, r)
        records = [sink.put("adapter_config.json", json.dumps(config, indent=2, sort_keys=True).encode()),
                   weights.write(sink)]
    return r, records


def adapter_config(spec: LoraExport, plan: _Plan, r: int) -> dict:
    """PEFT's LoraConfig fields. lora_alpha = r: scaling 1 (alpha is in lora_B). target_modules are the full
    module names (PEFT matches a name or its dotted suffix), so nothing else gets a LoRA layer."""
    lora = sorted(m.name for m in plan.modules)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.target_base,
              "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": lora, "bias": "none",
              "fan_in_fan_out": any(m.transposed for m in plan.modules), "use_dora": False, "use_rslora": False,
              "modules_to_save": plan.keep or None, "rank_pattern": {}, "alpha_pattern": {},
              "init_lora_weights": True, "inference_mode": True}
    if plan.lora_bias:
        config["lora_bias"] = True
    tokens = plan.tokens
    if tokens is not None and (tokens.changed or tokens.added):
        config["trainable_token_indices"] = {tokens.name.removesuffix(".weight"): tokens.changed + tokens.added}
    return config


def _manifest(run: _Run, r: int, files: list, seconds: float) -> dict:
    spec, source, plan = run.spec, run.source, run.plan
    modules = plan.modules
    factored = sum(m.entry["delta_sq"] for m in modules)
    lost = sum(m.entry["delta_sq"] * m.entry["rel_frobenius"] ** 2 for m in modules)
    left_sq = sum(e["delta_sq"] for e in plan.left.values())
    total = factored + left_sq + plan.carried_sq
    for entry in plan.left.values():
        entry["share"] = entry["delta_sq"] / total if total else 0.0
    inputs = {k: v for k, v in spec.model_dump().items() if k in ("source_base", "source_finetuned", "diff",
                                                                  "target_base") and v is not None}
    if source.artifact is not None:
        inputs["diff_content_address"] = source.artifact.manifest.content_address
    engine = {"name": "graft", "version": ENGINE_VERSION, "torch": torch.__version__}
    tokens = plan.tokens
    manifest = {
        "format": "graft-lora/1", "engine": engine, "request": spec.model_dump(), "inputs": inputs,
        "architecture": plan.layout.model_type, "rank": r, "lora_alpha": r, "scaling": 1.0,
        "factor_dtype": spec.factor_dtype,  # the modules' errors below are the float32 factors', before rounding
        "formula": "target + alpha * (source_finetuned - source_base) ~ target + lora_B @ lora_A "
                   "(lora_B = alpha * U S, lora_A = V^T; Conv1D: transposed)",
        "modules": {m.name: m.entry for m in modules}, "lora_bias": sorted(m.bias for m in modules if m.bias),
        "modules_to_save": plan.keep, "left_out": plan.left,
        "trainable_tokens": None if tokens is None else {"tensor": tokens.name, "changed_rows": len(tokens.changed),
                                                         "added_rows": len(tokens.added)},
        "totals": {"delta_sq": total, "left_out_share": left_sq / total if total else 0.0,
                   "factored_share": factored / total if total else 0.0,
                   "rel_frobenius_lora": math.sqrt(lost / factored) if factored else 0.0},
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        "stats": {"seconds_total": round(seconds, 3), "device": str(run.device)}}
    if spec.profile == "vllm" and plan.layout.model_type == "gpt2":
        manifest["warnings"] = [{"code": "vllm_no_lora", "message": "vLLM's GPT-2 model takes no LoRA adapters; "
                                 "PEFT loads this one (fan_in_fan_out)"}]
    return manifest


def _resolve(spec: LoraExport, request: LoraExportRequest, settings: EngineSettings):
    def one(role: str, uri: str) -> ResolvedModel:
        return resolve_model(role, parse_uri(uri, field=role), endpoint_url=settings.s3_endpoint_url,
                             max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                             allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                             retry=storage_retry(settings))

    target = one("target_base", spec.target_base)
    try:
        layout_of(target.config)
    except GraftError:
        target.store.close()
        raise
    if spec.diff is not None:
        from worker.engine.diffs.artifact import open_artifact
        from worker.engine.diffs.shard_cache import shard_cache_for

        artifact = open_artifact(spec.diff, parse_uri(spec.diff, field="diff"), endpoint_url=settings.s3_endpoint_url,
                                 max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                                 allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                                 retry=storage_retry(settings),
                                 shard_cache=shard_cache_for(settings.cache_dir, settings.artifact_cache_bytes))
        return target, DeltaSource({}, artifact), [artifact.store]
    models = {role: one(role, getattr(spec, role)) for role in ("source_base", "source_finetuned")}
    return target, DeltaSource(models), [m.store for m in models.values()]


def export_lora(request: LoraExportRequest, settings: EngineSettings | None = None, *,
                progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                before_commit: Callable[[dict], dict] | None = None) -> LoraResult:
    """Write the adapter of `request` (see the module's docstring); `progress` gets {modules_done, modules_total};
    `before_commit` gets the manifest before it is committed and returns sections to add to it (a check that
    raises publishes nothing)."""
    settings = settings or EngineSettings()
    spec = request.spec
    output = parse_uri(spec.output, field="output")
    device = pick_device(spec.device)
    target, source, stores = _resolve(spec, request, settings)
    try:
        with (publishing(output, request, settings, should_cancel, manifest_name=LORA_MANIFEST) as sink,
              InputHasher({"target_base": target, **source.models}, settings.hash_inputs,
                          settings.cache_dir or None) as hasher):
            started = time.perf_counter()
            run = _Run(spec, source, target, _plan(spec, source, target), device, progress, should_cancel,
                       settings.scratch_dir or None)
            r, files = _write_adapter(run, sink)
            manifest = _manifest(run, r, files, time.perf_counter() - started)
            hasher.join()
            manifest["input_files"] = hasher.result  # per input, its files' sizes and sha256
            if before_commit is not None:
                manifest.update(before_commit(manifest))
            manifest_uri = sink.commit(dumps(manifest))
    finally:
        for store in (target.store, *stores):
            store.close()
    return LoraResult(str(output), manifest_uri, manifest)
