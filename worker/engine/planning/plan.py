"""Planning: from three resolved models and the options, decide for every output tensor how it is made,
which rows come from where, its dtype and its shard. Headers only; no tensor data is read here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from worker.engine.errors import GraftError
from worker.engine.planning.options import GraftOptions
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import ARITHMETIC_FLOATS, TensorInfo, itemsize

ROLES = ("target_base", "source_base", "source_finetuned")
EMBED_NAME = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
LM_HEAD_NAME = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Segment:
    """Output elements [start, stop) made one way; inputs are read at the same element indices."""

    op: str  # "transfer", "target" (copy from target) or "finetuned" (copy from the fine-tune)
    start: int
    stop: int


@dataclass
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    action: str  # transferred | copied | vocab_extended | untied_transfer
    segments: list[Segment]
    sources: dict[str, TensorInfo]  # role -> the tensor read for that role
    compute_dtype: str = "F32"
    check_sources_equal: bool = False  # non-float buffers: report when the fine-tune changed them
    note: str = ""
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class Shard:
    file: str
    tensors: list[OutputTensor]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    tensors: list[OutputTensor]
    shards: list[Shard]
    source_only: list[dict]
    warnings: list[dict]
    config: dict
    tied_output: bool
    vocab: dict
    merge: object | None = None  # a recipe's MergeContext (planning/recipe_plan.py); None: the plain transfer
    memory: dict = field(default_factory=dict)  # what remote I/O holds at most (run.memory_bound)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.action] = out.get(t.action, 0) + 1
        return out

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def input_bytes(self) -> int:
        return sum(info.nbytes for t in self.tensors for info in t.sources.values())

    def to_dict(self) -> dict:
        return {
            "tensors_total": len(self.tensors),
            "actions": self.counts(),
            "output_bytes": self.output_bytes,
            "input_bytes_to_read": self.input_bytes(),
            "shards": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in self.shards],
            "tied_word_embeddings": self.tied_output,
            "vocab": self.vocab,
            "source_only": self.source_only,
            "warnings": self.warnings,
            **({"recipe": self.merge.summary()} if self.merge is not None else {}),
            **({"memory": self.memory} if self.memory else {}),
        }


def find_name(names, pattern: re.Pattern) -> str | None:
    hits = [n for n in names if pattern.search(n)]
    return sorted(hits, key=len)[0] if hits else None


def _effective(model: ResolvedModel, embed: str | None, head: str | None) -> tuple[dict[str, TensorInfo], bool]:
    """A model's tensors with a tied lm_head resolved to the embedding it shares storage with."""
    tensors = dict(model.tensors)
    tied = bool(embed and embed in tensors and (not head or head not in tensors))
    if tied and head:
        tensors[head] = tensors[embed]
    return tensors, tied


def _out_dtype(options: GraftOptions, stored: str) -> str:
    if options.dtype == "auto" or stored not in ARITHMETIC_FLOATS:
        return stored
    return _OUT_DTYPES[options.dtype]


def _shard(tensors: list[OutputTensor], shard_size: int) -> list[Shard]:
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _seeks(order: list[str], tensors: dict[str, TensorInfo]) -> int:
    """How often reading `tensors` in `order` jumps within a file instead of carrying on where that file's
    last read ended (each file is streamed on its own, so moving between files costs nothing)."""
    jumps, ends = 0, {}
    for name in order:
        info = tensors.get(name)
        if info is None:
            continue
        if ends.get(info.file) != info.start:
            jumps += 1
        ends[info.file] = info.end
    return jumps


def _read_friendly_order(names: list[str], eff: dict[str, dict[str, TensorInfo]]) -> list[str]:
    """The order to stream (and write) the output in: each input's own layout is a candidate, and the one
    that makes the three inputs jump least wins. Sharding the same model differently reorders its
    tensors (each file is sorted by name), and every jump costs remote inputs a new ranged request."""
    wanted = set(names)
    candidates = [names]
    for role in ("source_base", "source_finetuned"):
        # By name, not by the info's own name: a tied lm_head is an alias of the embedding's info.
        seen = sorted((n for n in eff[role] if n in wanted), key=lambda n: (eff[role][n].file, eff[role][n].start))
        placed = set(seen)
        candidates.append(seen + [n for n in names if n not in placed])
    return min(candidates, key=lambda order: sum(_seeks(order, eff[r]) for r in ROLES))


def build_plan(target: ResolvedModel, base: ResolvedModel, finetuned: ResolvedModel,
               options: GraftOptions) -> Plan:
    models = {"target_base": target, "source_base": base, "source_finetuned": finetuned}
    all_names = set().union(*(m.tensors for m in models.values()))
    embed = find_name(target.tensors, EMBED_NAME) or find_name(all_names, EMBED_NAME)
    head = find_name(target.tensors, LM_HEAD_NAME) or find_name(all_names, LM_HEAD_NAME) or (
        "lm_head.weight" if embed else None)
    eff: dict[str, dict[str, TensorInfo]] = {}
    tied: dict[str, bool] = {}
    for role, model in models.items():
        eff[role], tied[role] = _effective(model, embed, head)
    tied_output = all(tied.values())
    warnings: list[dict] = []
    if len(set(tied.values())) > 1:
        warnings.append({"code": "mixed_tying", "message": "embeddings are tied in "
                         + ", ".join(r for r in ROLES if tied[r]) + " only; the output unties lm_head"})

    t_eff, s_eff, f_eff = eff["target_base"], eff["source_base"], eff["source_finetuned"]
    order = _read_friendly_order(list(target.tensors), eff)
    assert sorted(order) == sorted(target.tensors), "the output order must hold each target tensor once"
    if head and head in t_eff and head not in target.tensors and not tied_output:
        order.append(head)  # the target was tied but the output cannot be: write lm_head out

    vocab_names = {n for n in (embed, head) if n}
    vocab_sizes = {role: m.vocab_size for role, m in models.items()}

    def is_vocab(name: str, infos: dict[str, TensorInfo]) -> bool:
        if name in vocab_names:
            return True
        if any(len(i.shape) == 0 for i in infos.values()):
            return False
        return all(vocab_sizes[r] is not None and i.shape[0] == vocab_sizes[r] for r, i in infos.items())

    tensors: list[OutputTensor] = []
    vocab_rows: dict = {}
    conflicts: list[str] = []
    for name in order:
        t = t_eff[name]
        s, f = s_eff.get(name), f_eff.get(name)
        out_dtype = _out_dtype(options, t.dtype)
        n = t.numel
        copy = OutputTensor(name, out_dtype, t.shape, "copied", [Segment("target", 0, n)], {"target_base": t})
        if name not in target.tensors:
            copy.note = f"untied from {embed}"
        if not options.selects(name):
            copy.note = "excluded by include/exclude"
            tensors.append(copy)
            continue
        if s is None or f is None:
            if s is not None or f is not None:
                missing = "source_base" if s is None else "source_finetuned"
                warnings.append({"code": "missing_in_source", "tensor": name,
                                 "message": f"{name} is missing from {missing}; copied from the target"})
                copy.note = f"missing from {missing}"
            tensors.append(copy)
            continue
        infos = {"target_base": t, "source_base": s, "source_finetuned": f}
        if t.dtype not in ARITHMETIC_FLOATS or s.dtype not in ARITHMETIC_FLOATS or f.dtype not in ARITHMETIC_FLOATS:
            if t.dtype in ARITHMETIC_FLOATS or s.dtype in ARITHMETIC_FLOATS or f.dtype in ARITHMETIC_FLOATS:
                warnings.append({"code": "dtype_mismatch", "tensor": name, "message":
                                 f"{name}: dtypes {t.dtype}/{s.dtype}/{f.dtype} cannot be grafted; copied from target"})
            elif t.shape == s.shape == f.shape and s.dtype == f.dtype:
                # Compared at the target's element indices: only when all three hold the same elements.
                copy.sources = {"target_base": t, "source_base": s, "source_finetuned": f}
                copy.check_sources_equal = True
            copy.note = copy.note or "not a float tensor"
            tensors.append(copy)
            continue
        vocab = is_vocab(name, infos)
        rest = {i.shape[1:] if vocab else i.shape for i in infos.values()}
        if len(rest) > 1 or len({len(i.shape) for i in infos.values()}) > 1:
            conflicts.append(f"{name}: target {list(t.shape)}, source_base {list(s.shape)}, "
                             f"source_finetuned {list(f.shape)}")
            continue
        compute = "F64" if "F64" in (t.dtype, s.dtype, f.dtype) else "F32"
        if t.shape == s.shape == f.shape:
            tensors.append(OutputTensor(name, out_dtype, t.shape, "transferred" if name in target.tensors
                                        else "untied_transfer", [Segment("transfer", 0, n)], infos, compute,
                                        note=copy.note))
            continue
        # Vocabulary axis: rows all three share get the delta; the others are copied as the policy says.
        rt, rs, rf = t.shape[0], s.shape[0], f.shape[0]
        row = math.prod(t.shape[1:])
        shared = min(rt, rs, rf)
        out_rows = max(rt, rf) if options.vocab == "extend" else rt
        segments = [Segment("transfer", 0, shared * row)] if shared else []
        if rt > shared:
            segments.append(Segment("target", shared * row, rt * row))
        if out_rows > rt:
            segments.append(Segment("finetuned", rt * row, out_rows * row))
        rows = {"transferred": shared, "from_target": rt - shared, "from_finetuned": max(0, out_rows - rt),
                "target_rows": rt, "source_base_rows": rs, "finetuned_rows": rf, "output_rows": out_rows}
        if rt != rs:
            warnings.append({"code": "vocab_differs", "tensor": name, "message":
                             f"{name}: target has {rt} rows, source_base {rs}; rows past {shared} "
                             "keep their own ids, which may not name the same tokens"})
        vocab_rows[name] = rows
        tensors.append(OutputTensor(name, out_dtype, (out_rows, *t.shape[1:]), "vocab_extended"
                                    if out_rows > rt else "transferred", segments, infos, compute,
                                    note=copy.note, rows=rows))
    if conflicts:
        raise GraftError("shape_conflict", "tensor shapes disagree outside the vocabulary axis (exclude them "
                         "to copy from the target): " + "; ".join(conflicts), {"tensors": conflicts})

    in_sources = set(s_eff) | set(f_eff)
    source_only = [{"tensor": n, "in": [r for r in ("source_base", "source_finetuned") if n in eff[r]]}
                   for n in sorted(in_sources - set(t_eff))]
    if head in {d["tensor"] for d in source_only} and tied_output:
        source_only = [d for d in source_only if d["tensor"] != head]

    out_by_name = {t.name: t for t in tensors}
    config = dict(target.config)
    vocab_info = {"policy": options.vocab, "tensors": vocab_rows}
    rows_out = {out_by_name[n].shape[0] for n in (embed, head) if n and n in out_by_name}
    if len(rows_out) > 1:
        raise GraftError("vocab_mismatch", f"{embed} and {head} would get different row counts {sorted(rows_out)}; "
                         "include or exclude both of them")
    if rows_out:
        config["vocab_size"] = rows_out.pop()
        vocab_info["output_rows"] = config["vocab_size"]
    config["tie_word_embeddings"] = tied_output
    if options.dtype != "auto":
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[key] = options.dtype
    return Plan(tensors, _shard(tensors, options.shard_size), source_only, warnings, config, tied_output,
                vocab_info)
