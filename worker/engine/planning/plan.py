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


@dataclass
class _Inputs:
    """The three models as the planner sees them: each one's tensors with a tied lm_head resolved to its
    embedding, the vocabulary tensors' names and sizes."""

    target: ResolvedModel
    eff: dict[str, dict[str, TensorInfo]]
    tied: dict[str, bool]
    embed: str | None
    head: str | None
    vocab_sizes: dict[str, int | None]

    @classmethod
    def of(cls, models: dict[str, ResolvedModel]) -> _Inputs:
        target = models["target_base"]
        all_names = set().union(*(m.tensors for m in models.values()))
        embed = find_name(target.tensors, EMBED_NAME) or find_name(all_names, EMBED_NAME)
        head = find_name(target.tensors, LM_HEAD_NAME) or find_name(all_names, LM_HEAD_NAME) or (
            "lm_head.weight" if embed else None)
        eff, tied = {}, {}
        for role, model in models.items():
            eff[role], tied[role] = _effective(model, embed, head)
        return cls(target, eff, tied, embed, head, {role: m.vocab_size for role, m in models.items()})

    @property
    def tied_output(self) -> bool:
        return all(self.tied.values())

    def is_vocab(self, name: str, infos: dict[str, TensorInfo]) -> bool:
        """Whether a tensor's first axis is the vocabulary (rows may then differ between the models)."""
        if name in (self.embed, self.head):
            return True
        if any(len(i.shape) == 0 for i in infos.values()):
            return False
        return all(self.vocab_sizes[r] is not None and i.shape[0] == self.vocab_sizes[r] for r, i in infos.items())

    def order(self) -> list[str]:
        order = _read_friendly_order(list(self.target.tensors), self.eff)
        assert sorted(order) == sorted(self.target.tensors), "the output order must hold each target tensor once"
        head = self.head
        if head and head in self.eff["target_base"] and head not in self.target.tensors and not self.tied_output:
            order.append(head)  # the target was tied but the output cannot be: write lm_head out
        return order


@dataclass
class _Planned:
    """What planning the tensors one by one collects."""

    tensors: list[OutputTensor] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    vocab_rows: dict = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


def build_plan(target: ResolvedModel, base: ResolvedModel, finetuned: ResolvedModel,
               options: GraftOptions) -> Plan:
    inputs = _Inputs.of({"target_base": target, "source_base": base, "source_finetuned": finetuned})
    planned = _Planned()
    if len(set(inputs.tied.values())) > 1:
        planned.warnings.append({"code": "mixed_tying", "message": "embeddings are tied in "
                                 + ", ".join(r for r in ROLES if inputs.tied[r]) + " only; the output unties lm_head"})
    for name in inputs.order():
        _plan_tensor(name, inputs, options, planned)
    if planned.conflicts:
        raise GraftError("shape_conflict", "tensor shapes disagree outside the vocabulary axis (exclude them "
                         "to copy from the target): " + "; ".join(planned.conflicts), {"tensors": planned.conflicts})
    config, vocab_info = _output_config(inputs, planned, options)
    return Plan(planned.tensors, _shard(planned.tensors, options.shard_size), _source_only(inputs),
                planned.warnings, config, inputs.tied_output, vocab_info)


def _plan_tensor(name: str, inputs: _Inputs, options: GraftOptions, planned: _Planned) -> None:
    """How one output tensor is made: copied from the target, or transferred (on the rows all three share)."""
    eff = inputs.eff
    t = eff["target_base"][name]
    s, f = eff["source_base"].get(name), eff["source_finetuned"].get(name)
    out_dtype = _out_dtype(options, t.dtype)
    copy = OutputTensor(name, out_dtype, t.shape, "copied", [Segment("target", 0, t.numel)], {"target_base": t})
    if name not in inputs.target.tensors:
        copy.note = f"untied from {inputs.embed}"
    if not options.selects(name):
        copy.note = "excluded by include/exclude"
        planned.tensors.append(copy)
        return
    if s is None or f is None:
        if s is not None or f is not None:
            missing = "source_base" if s is None else "source_finetuned"
            planned.warnings.append({"code": "missing_in_source", "tensor": name,
                                     "message": f"{name} is missing from {missing}; copied from the target"})
            copy.note = f"missing from {missing}"
        planned.tensors.append(copy)
        return
    infos = {"target_base": t, "source_base": s, "source_finetuned": f}
    if not all(i.dtype in ARITHMETIC_FLOATS for i in infos.values()):
        _non_float(copy, infos, planned)
        return
    vocab = inputs.is_vocab(name, infos)
    rest = {i.shape[1:] if vocab else i.shape for i in infos.values()}
    if len(rest) > 1 or len({len(i.shape) for i in infos.values()}) > 1:
        planned.conflicts.append(f"{name}: target {list(t.shape)}, source_base {list(s.shape)}, "
                                 f"source_finetuned {list(f.shape)}")
        return
    compute = "F64" if "F64" in (t.dtype, s.dtype, f.dtype) else "F32"
    if t.shape == s.shape == f.shape:
        action = "transferred" if name in inputs.target.tensors else "untied_transfer"
        planned.tensors.append(OutputTensor(name, out_dtype, t.shape, action, [Segment("transfer", 0, t.numel)],
                                            infos, compute, note=copy.note))
        return
    planned.tensors.append(_vocab_tensor(copy, infos, compute, options, planned))


def _non_float(copy: OutputTensor, infos: dict[str, TensorInfo], planned: _Planned) -> None:
    """A tensor that is not float in every model: copied from the target, compared when all are buffers."""
    t, s, f = (infos[r] for r in ROLES)
    name = copy.name
    if t.dtype in ARITHMETIC_FLOATS or s.dtype in ARITHMETIC_FLOATS or f.dtype in ARITHMETIC_FLOATS:
        planned.warnings.append({"code": "dtype_mismatch", "tensor": name, "message":
                                 f"{name}: dtypes {t.dtype}/{s.dtype}/{f.dtype} cannot be grafted; copied from target"})
    elif t.shape == s.shape == f.shape and s.dtype == f.dtype:
        # Compared at the target's element indices: only when all three hold the same elements.
        copy.sources = dict(infos)
        copy.check_sources_equal = True
    copy.note = copy.note or "not a float tensor"
    planned.tensors.append(copy)


def _vocab_tensor(copy: OutputTensor, infos: dict[str, TensorInfo], compute: str, options: GraftOptions,
                  planned: _Planned) -> OutputTensor:
    """Vocabulary axis: rows all three share get the delta; the others are copied as the policy says."""
    t = infos["target_base"]
    name = copy.name
    rt, rs, rf = t.shape[0], infos["source_base"].shape[0], infos["source_finetuned"].shape[0]
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
        planned.warnings.append({"code": "vocab_differs", "tensor": name, "message":
                                 f"{name}: target has {rt} rows, source_base {rs}; rows past {shared} "
                                 "keep their own ids, which may not name the same tokens"})
    planned.vocab_rows[name] = rows
    return OutputTensor(name, copy.dtype, (out_rows, *t.shape[1:]), "vocab_extended" if out_rows > rt
                        else "transferred", segments, infos, compute, note=copy.note, rows=rows)


def _source_only(inputs: _Inputs) -> list[dict]:
    """Tensors the sources hold and the target does not (reported; a tied output's lm_head is no loss)."""
    eff = inputs.eff
    in_sources = set(eff["source_base"]) | set(eff["source_finetuned"])
    source_only = [{"tensor": n, "in": [r for r in ("source_base", "source_finetuned") if n in eff[r]]}
                   for n in sorted(in_sources - set(eff["target_base"]))]
    if inputs.head in {d["tensor"] for d in source_only} and inputs.tied_output:
        source_only = [d for d in source_only if d["tensor"] != inputs.head]
    return source_only


def _output_config(inputs: _Inputs, planned: _Planned, options: GraftOptions) -> tuple[dict, dict]:
    """The output's config (the target's, with the vocabulary size, tying and dtype the plan decided) and the
    plan's vocabulary summary."""
    out_by_name = {t.name: t for t in planned.tensors}
    embed, head = inputs.embed, inputs.head
    config = dict(inputs.target.config)
    vocab_info = {"policy": options.vocab, "tensors": planned.vocab_rows}
    rows_out = {out_by_name[n].shape[0] for n in (embed, head) if n and n in out_by_name}
    if len(rows_out) > 1:
        raise GraftError("vocab_mismatch", f"{embed} and {head} would get different row counts {sorted(rows_out)}; "
                         "include or exclude both of them")
    if rows_out:
        config["vocab_size"] = rows_out.pop()
        vocab_info["output_rows"] = config["vocab_size"]
    config["tie_word_embeddings"] = inputs.tied_output
    if options.dtype != "auto":
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[key] = options.dtype
    return config, vocab_info
