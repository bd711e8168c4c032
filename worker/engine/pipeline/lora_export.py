"""Exporting a transfer as a LoRA adapter: the delta of a source pair (or of a diff artifact) factored per linear
module by the `lowrank` encoding's streaming randomized SVD, checked against the target it is meant for, and
written as PEFT writes an adapter (`adapter_config.json`, `adapter_model.safetensors`) with `lora-manifest.json`
committed last.

Each module's delta A (out x in, as Linear stores it) is fed to the encoder in row chunks, one pass after the
other (3 + 2 x power_iterations reads of that one matrix; never the model): U (singular values folded in) and V
come back, and lora_B = alpha U, lora_A = V. `lora_alpha` is written equal to `r`, so PEFT's and vLLM's scaling
(lora_alpha / r) is 1 and the transfer strength `alpha` is in lora_B. Every module's factors are padded with zero
rows/columns to the adapter's one rank (exact: a zero rank-one term adds nothing), so no rank_pattern is needed.

Profiles: `vllm` writes LoRA on linear modules only (no modules_to_save, no bias, no DoRA) at a rank vLLM
accepts (the asked rank rounded up to VLLM_RANKS); `peft` also carries, through `modules_to_save`, every other
module whose tensors the target has with the same shape (norms, embeddings, lm_head) as target + alpha x delta
(never the fine-tune's values: those belong to the old base), and the biases of LoRA modules as `lora_B.bias`
(`lora_bias: true`). What a profile leaves out is listed in the manifest with its share of ||delta||^2.

Linear weights only (Llama, Mistral, Qwen2, Qwen3 families): GPT-2's Conv1D ([in, out]) is refused for now."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import save

from worker.engine.config import EngineSettings
from worker.engine.diffs.encoding_params import MAX_RANK, LowRankParams
from worker.engine.diffs.encodings.lowrank import LowRankEncoder
from worker.engine.diffs.encodings.memory_parts import MemoryParts
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.pipeline.lora_request import (  # noqa: F401 (re-exported)
    DEFAULT_MODULES,
    VLLM_RANKS,
    LoraExport,
    LoraExportRequest,
    vllm_rank,
)
from worker.engine.pipeline.manifest import ENGINE_VERSION, dumps
from worker.engine.pipeline.publish import publishing, storage_retry
from worker.engine.pipeline.resolve import remote_reads
from worker.engine.planning.patterns import compile_pattern
from worker.engine.storage.input_hashes import InputHasher
from worker.engine.storage.model import ResolvedModel, resolve_model
from worker.engine.storage.safetensors_format import DTYPES
from worker.engine.storage.uris import parse_uri

LORA_MANIFEST = "lora-manifest.json"
LINEAR_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # nn.Linear weights, [out, in]
CHUNK = 1 << 20  # elements read at a time


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
    shape: tuple[int, int]
    rank: int = 0
    entry: dict = field(default_factory=dict)


def _select(spec: LoraExport, source: DeltaSource, target: ResolvedModel) -> tuple[list[_Module], list[str]]:
    """The LoRA modules (2-D `.weight` tensors whose module name the regex finds) and every other delta tensor.
    A LoRA module whose delta does not have the target's shape is refused: the adapter would not load."""
    pattern, modules, rest = compile_pattern(spec.modules, "modules"), [], []
    names = source.artifact.manifest.tensors if source.artifact is not None else source.models["source_base"].tensors
    for name in names:
        shape = source.shape(name)
        if shape is None:
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and len(shape) == 2 and pattern.search(module) and "embed" not in module:
            info = target.tensors.get(name)
            if info is None or tuple(info.shape) != shape:
                found = list(info.shape) if info is not None else None
                raise GraftError("shape_mismatch", f"{name}: the delta is {list(shape)}, the target's is {found}: "
                                 "an adapter on this target cannot hold it", {"tensor": name})
            modules.append(_Module(module, shape))
        else:
            rest.append(name)
    if not modules:
        raise GraftError("no_modules", f"no 2-D linear weight matches --modules {spec.modules!r}")
    return modules, rest


def _factor(source: DeltaSource, module: _Module, spec: LoraExport, cap: int,
            should_cancel: Callable[[], bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's U (out x r, singular values folded in) and V (r x in), streamed pass by pass."""
    m, n = module.shape
    params = LowRankParams(encoding="lowrank", rank=spec.rank, energy=spec.energy,
                           power_iterations=spec.power_iterations, seed=spec.seed)
    target = min(cap, m, n)
    parts = MemoryParts()
    compute = source.read(module.name + ".weight", 0, 1).dtype
    encoder = LowRankEncoder(module.shape, compute, params, target, parts)
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
    return parts.tensor("U").view(m, r), parts.tensor("V").view(r, n)


def _pad(u: torch.Tensor, v: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rank terms up to the adapter's rank r: B A is unchanged."""
    extra = r - u.shape[1]
    return (torch.nn.functional.pad(u, (0, extra)).contiguous(), torch.nn.functional.pad(v, (0, 0, 0, extra))
            .contiguous())


def _delta_sq(source: DeltaSource, name: str) -> float:
    return sum(float(c.double().square().sum()) for _, c in source.chunks(name, source.shape(name)))


def _carried(source: DeltaSource, target: ResolvedModel, name: str, alpha: float) -> torch.Tensor | None:
    """target + alpha x delta for a tensor the target holds at the delta's shape, in the target's dtype (as the
    graft writes it); None where it cannot be (another shape, absent)."""
    info, shape = target.tensors.get(name), source.shape(name)
    if info is None or tuple(info.shape) != shape or not DTYPES[info.dtype].is_floating_point:
        return None
    count = math.prod(shape)
    delta = source.read(name, 0, count)
    value = _read(target.store, info, 0, count, delta.dtype).add_(delta, alpha=alpha)
    return value.to(DTYPES[info.dtype]).view(shape)


def _rest(spec: LoraExport, source: DeltaSource, target: ResolvedModel, lora: set[str]):
    """The tensors not factored: (modules_to_save tensors, lora_B biases, modules_to_save names, left out)."""
    saved, biases, keep, left = {}, {}, set(), {}
    modules = {}
    for name in _rest_names(spec, source, lora):
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for module, names in modules.items():
        if spec.profile == "peft" and module in lora and all(n.endswith(".bias") for n in names):
            carried = {n: _carried(source, target, n, spec.alpha) for n in names}
            if all(v is not None for v in carried.values()):
                biases.update(carried)
                continue
        values = {n: _carried(source, target, n, spec.alpha) for n in names} if spec.profile == "peft" else {}
        if values and module not in lora and all(v is not None for v in values.values()) \
                and not _tied(target, module):
            saved.update(values)
            keep.add(module)
            continue
        for n in names:
            left[n] = {"reason": _reason(spec, source, target, n, module in lora), "delta_sq": _delta_sq(source, n)}
    return saved, biases, sorted(keep), left


def _rest_names(spec: LoraExport, source: DeltaSource, lora: set[str]) -> list[str]:
    names = source.artifact.manifest.tensors if source.artifact is not None else source.models["source_base"].tensors
    return [n for n in names if source.shape(n) is not None and n.removesuffix(".weight") not in lora
            or (n.endswith(".bias") and n.rsplit(".", 1)[0] in lora)]


def _tied(target: ResolvedModel, module: str) -> bool:
    return module.endswith("embed_tokens") and bool(target.config.get("tie_word_embeddings")) \
        and "lm_head.weight" not in target.tensors


def _reason(spec: LoraExport, source: DeltaSource, target: ResolvedModel, name: str, bias: bool) -> str:
    info = target.tensors.get(name)
    if info is None:
        return "not in the target"
    if tuple(info.shape) != source.shape(name):
        return f"the target's shape {list(info.shape)} differs from the delta's {list(source.shape(name))}"
    if spec.profile == "vllm":
        return "bias: vLLM loads no LoRA bias" if bias else "not a linear module: vLLM loads no modules_to_save"
    return "tied embeddings: PEFT's modules_to_save would untie them"


def _resolve(spec: LoraExport, request: LoraExportRequest, settings: EngineSettings):
    def one(role: str, uri: str) -> ResolvedModel:
        return resolve_model(role, parse_uri(uri, field=role), endpoint_url=settings.s3_endpoint_url,
                             max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                             allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                             retry=storage_retry(settings))

    target = one("target_base", spec.target_base)
    if target.config.get("model_type") not in LINEAR_TYPES:
        target.store.close()
        raise GraftError("unsupported_architecture", f"LoRA export supports {', '.join(LINEAR_TYPES)} targets "
                         f"(nn.Linear weights); this one is {target.config.get('model_type')!r} (GPT-2's Conv1D, "
                         "stored [in, out], is not supported yet)")
    if spec.diff is not None:
        from worker.engine.diffs.artifact import open_artifact

        artifact = open_artifact(spec.diff, parse_uri(spec.diff, field="diff"), endpoint_url=settings.s3_endpoint_url,
                                 max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                                 allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                                 retry=storage_retry(settings))
        return target, DeltaSource({}, artifact), [artifact.store]
    models = {role: one(role, getattr(spec, role)) for role in ("source_base", "source_finetuned")}
    return target, DeltaSource(models), [m.store for m in models.values()]


def export_lora(request: LoraExportRequest, settings: EngineSettings | None = None, *,
                progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> LoraResult:
    """Write the adapter of `request` (see the module's docstring); `progress` gets {modules_done, modules_total}."""
    settings = settings or EngineSettings()
    spec = request.spec
    output = parse_uri(spec.output, field="output")
    target, source, stores = _resolve(spec, request, settings)
    try:
        with (publishing(output, request, settings, should_cancel, manifest_name=LORA_MANIFEST) as sink,
              InputHasher({"target_base": target, **source.models}, settings.hash_inputs,
                          settings.cache_dir or None) as hasher):
            manifest = _export(spec, source, target, sink, progress, should_cancel)
            hasher.join()
            manifest["input_files"] = hasher.result  # per input, its files' sizes and sha256
            manifest_uri = sink.commit(dumps(manifest))
    finally:
        for store in (target.store, *stores):
            store.close()
    return LoraResult(str(output), manifest_uri, manifest)


def _export(spec, source, target, sink, progress, should_cancel) -> dict:
    started = time.perf_counter()
    modules, _ = _select(spec, source, target)
    cap = spec.rank if spec.rank is not None else min(MAX_RANK, 512 if spec.profile == "vllm" else MAX_RANK)
    if spec.profile == "vllm" and spec.rank is not None:
        cap = vllm_rank(spec.rank)  # the rank the adapter has: factor at it (more of the delta, same size)
    factors = {}
    for done, module in enumerate(modules):
        factors[module.name] = _factor(source, module, spec, cap, should_cancel)
        if progress is not None:
            progress({"modules_done": done + 1, "modules_total": len(modules)})
    r = max(1, max(m.rank for m in modules))
    r = vllm_rank(r) if spec.profile == "vllm" else r
    lora = {m.name for m in modules}
    saved, biases, keep, left = _rest(spec, source, target, lora)
    tensors = {}
    for name, (u, v) in factors.items():
        u, v = _pad(u, v, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = v
        tensors[f"base_model.model.{name}.lora_B.weight"] = (u * spec.alpha).contiguous()
    for name, value in biases.items():
        module = name.rsplit(".", 1)[0]
        tensors[f"base_model.model.{module}.lora_B.bias"] = (value.float() - _read(
            target.store, target.tensors[name], 0, value.numel(), torch.float32)).contiguous()
    if biases:  # lora_bias gives every LoRA module a lora_B.bias: zero where the module's bias has no delta
        for module in lora - {n.rsplit(".", 1)[0] for n in biases}:
            tensors[f"base_model.model.{module}.lora_B.bias"] = torch.zeros(factors[module][0].shape[0])
    for name, value in saved.items():
        tensors[f"base_model.model.{name}"] = value.contiguous()
    config = adapter_config(spec, target, sorted(lora), keep, r, bool(biases))
    weights = save(tensors)
    files = [sink.put("adapter_config.json", json.dumps(config, indent=2, sort_keys=True).encode()),
             sink.put("adapter_model.safetensors", weights)]
    return _manifest(spec, source, modules, r, biases, keep, left, files, time.perf_counter() - started)


def adapter_config(spec: LoraExport, target: ResolvedModel, lora: list[str], keep: list[str], r: int,
                   bias: bool) -> dict:
    """PEFT's LoraConfig fields. lora_alpha = r: scaling 1 (alpha is in lora_B). target_modules are the full
    module names (PEFT matches a name or its dotted suffix), so nothing else gets a LoRA layer."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.target_base,
              "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": lora, "bias": "none",
              "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "modules_to_save": keep or None,
              "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True}
    if bias:
        config["lora_bias"] = True
    return config


def _manifest(spec, source, modules, r, biases, keep, left, files, seconds) -> dict:
    factored = sum(m.entry["delta_sq"] for m in modules)
    lost = sum(m.entry["delta_sq"] * m.entry["rel_frobenius"] ** 2 for m in modules)
    left_sq = sum(e["delta_sq"] for e in left.values())
    total = factored + left_sq + sum(_delta_sq(source, n) for n in biases) + \
        sum(_delta_sq(source, n) for n in _rest_names(spec, source, {m.name for m in modules})
            if n.rsplit(".", 1)[0] in keep)
    for entry in left.values():
        entry["share"] = entry["delta_sq"] / total if total else 0.0
    inputs = {k: v for k, v in spec.model_dump().items() if k in ("source_base", "source_finetuned", "diff",
                                                                  "target_base") and v is not None}
    if source.artifact is not None:
        inputs["diff_content_address"] = source.artifact.manifest.content_address
    engine = {"name": "graft", "version": ENGINE_VERSION, "torch": torch.__version__}
    return {"format": "graft-lora/1", "engine": engine,
            "request": spec.model_dump(), "inputs": inputs, "rank": r, "lora_alpha": r, "scaling": 1.0,
            "formula": "target + alpha * (source_finetuned - source_base) ~ target + lora_B @ lora_A "
                       "(lora_B = alpha * U S, lora_A = V^T)",
            "modules": {m.name: m.entry for m in modules}, "lora_bias": sorted(biases), "modules_to_save": keep,
            "left_out": left,
            "totals": {"delta_sq": total, "left_out_share": left_sq / total if total else 0.0,
                       "factored_share": factored / total if total else 0.0,
                       "rel_frobenius_lora": math.sqrt(lost / factored) if factored else 0.0},
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            "stats": {"seconds_total": round(seconds, 3)}}
