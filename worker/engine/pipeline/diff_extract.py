"""Extracting a diff artifact, start to end: resolve the source pair -> plan (the graft's planner, with the source
base as the target: the delta is formed on the rows the pair shares, the fine-tune's added rows are kept) ->
stream (the pass runner; each tensor fed to its encoder as many times as the encoding reads it, its source base
and delta sketched on the first) -> write (shards through the artifact writer, the fine-tune's side files) ->
commit (diff-manifest.json, last). The delta is the pair's own arithmetic: f and s in the compute dtype, f - s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from worker.engine.compute.blocks import Piece, Visit, build_blocks
from worker.engine.compute.merge_kernel import Scratch
from worker.engine.compute.passes import PassTotals, Reading, run_pass, view_of
from worker.engine.config import EngineSettings
from worker.engine.diffs.artifact import BASE_PREFIX, DIFF_MANIFEST, FORMAT
from worker.engine.diffs.artifact_writer import ArtifactWriter, TensorParts
from worker.engine.diffs.encodings import ENCODINGS, FALLBACK
from worker.engine.diffs.request import DiffExtractRequest
from worker.engine.diffs.sketch import Sketcher
from worker.engine.phases import Phase
from worker.engine.pipeline.manifest import ENGINE_VERSION, dumps
from worker.engine.pipeline.publish import publishing, storage_retry
from worker.engine.pipeline.resolve import canonical_roles, close_models, remote_reads
from worker.engine.planning.options import GraftOptions
from worker.engine.planning.plan import OutputTensor, Plan, Segment, build_plan
from worker.engine.storage.input_hashes import InputHasher
from worker.engine.storage.model import GENERATION_CONFIG, TOKENIZER_FILES, ResolvedModel, resolve_model
from worker.engine.storage.safetensors_format import DTYPES
from worker.engine.storage.sinks import FileRecord
from worker.engine.storage.uris import parse_uri

SIDES = ("source_base", "source_finetuned")


@dataclass
class ExtractProgress:
    phase: Phase
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_read: int = 0
    bytes_total: int = 0

    @property
    def fraction(self) -> float:
        return self.bytes_read / self.bytes_total if self.bytes_total else 0.0


@dataclass
class _Job:
    """One tensor's extraction: its plan entry, its encoding, and what the passes over it gather."""

    tensor: OutputTensor
    shape: tuple[int, ...]  # of the delta
    stored: str
    params: object
    passes: int
    rows: int
    extra: Segment | None = None  # the fine-tune's rows past the base's, stored as they are
    encoder: object = None
    parts: TensorParts | None = None
    sketches: tuple[Sketcher, Sketcher] | None = None
    norms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # delta_sq, base_sq, base_delta
    entry: dict = field(default_factory=dict)

    @property
    def compute(self) -> torch.dtype:
        return DTYPES[self.tensor.compute_dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _choose(tensor: OutputTensor, shape: tuple[int, ...], params) -> tuple[str, object, int, int]:
    """The encoding that stores a tensor (the asked one, or exact where it does not apply), its passes and rows."""
    name = params.encoding
    encoding = ENCODINGS[name]
    if not encoding.applies_to(shape):
        name, encoding = FALLBACK, ENCODINGS[FALLBACK]
        params = encoding.Params(encoding=FALLBACK)
    probe = encoding.encoder(shape, DTYPES[tensor.compute_dtype], params, _Discard())
    return name, params, probe.passes, probe.rows


class _Discard:
    """The PartWriter of an encoder asked for its passes and rows only: what it writes goes nowhere."""

    def part(self, name: str, dtype: str) -> _Discard:
        return self

    def write(self, data) -> None:
        pass


def _jobs(plan: Plan, params) -> list[_Job]:
    jobs = []
    for t in plan.tensors:
        if t.action == "copied":
            continue
        transfer = [s for s in t.segments if s.op == "transfer"]
        extra = next((s for s in t.segments if s.op == "finetuned"), None)
        shape = t.shape if not t.rows else (t.rows["transferred"], *t.shape[1:])
        assert len(transfer) <= 1 and (not transfer or transfer[0].stop == math.prod(shape)), t.name
        stored, chosen, passes, rows = _choose(t, shape, params)
        jobs.append(_Job(t, shape, stored, chosen, passes, rows, extra))
    return jobs


def _start(job: _Job, writer: ArtifactWriter) -> None:
    job.parts = writer.tensor(job.tensor.name)
    job.encoder = ENCODINGS[job.stored].encoder(job.shape, job.compute, job.params, job.parts)
    job.sketches = (Sketcher(job.tensor.name, job.numel), Sketcher(job.tensor.name, job.numel))


class _ExtractVisitor:
    """Feeds each tensor's delta to its encoder, pass by pass; sketches and sums on the first pass; writes the
    fine-tune's extra rows; compares the non-float buffers the pair shares."""

    def __init__(self, writer: ArtifactWriter, roles: dict[int, tuple[_Job | OutputTensor, object]]) -> None:
        self.writer, self.roles = writer, roles
        self.scratch = Scratch()
        self.changed: list[str] = []
        self.done = 0

    def visit(self, piece: Piece, buffers: list[memoryview], out: memoryview | None) -> None:
        job, what = self.roles[id(piece.tensor)]
        count = piece.stop - piece.start
        src = piece.tensor.sources
        if what == "compare":
            s, f = (view_of(buffers, piece.reads[r], src[r].dtype, count) for r in SIDES)
            if not torch.equal(s, f) and job.name not in self.changed:
                self.changed.append(job.name)
            return
        if what == "rows":
            idx, offset = piece.reads["source_finetuned"]
            size = DTYPES[src["source_finetuned"].dtype].itemsize
            if job.parts is None:
                _start(job, self.writer)
            part = job.parts.parts.get("rows") or job.parts.part("rows", src["source_finetuned"].dtype)
            part.write(buffers[idx][offset:offset + count * size])
            if piece.last:
                self._close(job)
            return
        self._delta(job, what, piece, buffers, count)

    def _delta(self, job: _Job, index: int, piece: Piece, buffers: list[memoryview], count: int) -> None:
        src = piece.tensor.sources
        if job.encoder is None:
            _start(job, self.writer)
        lend = self.scratch.lender(count, job.compute, torch.device("cpu"))
        s = lend("base").copy_(view_of(buffers, piece.reads["source_base"], src["source_base"].dtype, count))
        # Copies, reused: a float32 input's view is the read buffer itself, which a later pass may read again.
        d = lend("delta").copy_(view_of(buffers, piece.reads["source_finetuned"], src["source_finetuned"].dtype,
                                        count))
        d.sub_(s)  # the pair's delta: its kernels form exactly this, f - s in the compute dtype
        if index == 0:
            job.sketches[0].add(piece.start, s)
            job.sketches[1].add(piece.start, d)
            job.norms[0] += float(torch.dot(d, d))
            job.norms[1] += float(torch.dot(s, s))
            job.norms[2] += float(torch.dot(s, d))
        job.encoder.feed(index, piece.start, d)
        if piece.last:
            job.encoder.end_pass(index)
            if index == job.passes - 1:
                self.encoded(job)

    def encoded(self, job: _Job) -> None:
        info = job.encoder.finish()
        encoded = job.parts.nbytes
        for k, sketch in zip(("sketch.base", "sketch.delta"), job.sketches, strict=True):
            job.parts.add_bytes(k, "F64", sketch.sketch.numpy().tobytes())
        job.entry = {"shape": list(job.shape), "compute": job.tensor.compute_dtype, "stored": job.stored,
                     "meta": info.meta, "parts": [p for p in job.parts.parts if p not in ("sketch.base",
                                                                                         "sketch.delta")],
                     "encoded_bytes": encoded, "rel_frobenius": _finite(info.rel_frobenius),
                     "max_abs": _finite(info.max_abs), "extra": info.extra,
                     "norms": dict(zip(("delta_sq", "base_sq", "base_delta"), job.norms, strict=True)),
                     "sketch": True}
        job.encoder = job.sketches = None  # their state (a low-rank factor's sketch, a histogram) goes now
        if job.extra is None:
            self._close(job)

    def _close(self, job: _Job) -> None:
        if job.extra is not None:
            rows = job.tensor.rows
            job.entry["rows"] = {"first_row": rows["target_rows"], "rows": rows["output_rows"] - rows["target_rows"],
                                 "dtype": job.tensor.sources["source_finetuned"].dtype}
        self.writer.add(job.parts)
        job.entry["shard"] = self.writer.placed.get(job.tensor.name, "")
        self.done += 1


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _visits(plan: Plan, jobs: list[_Job]) -> tuple[list[Visit], dict[int, tuple]]:
    """Each tensor's passes one after the other (its bytes are then near at hand for the next pass: the page
    cache, a store's window), its extra rows after them; the shared buffers compared."""
    visits, roles = [], {}

    def add(tensor: OutputTensor, owner, what, segments, read: tuple[str, ...], rows: int = 0) -> None:
        proxy = dataclasses.replace(tensor)
        roles[id(proxy)] = (owner, what)
        visits.append(Visit(proxy, segments, roles=read, unit=tensor.compute_dtype if what != "rows" else None,
                            rows=rows))

    for job in jobs:
        transfer = [s for s in job.tensor.segments if s.op == "transfer"]
        for index in range(job.passes if transfer else 0):
            add(job.tensor, job, index, transfer, SIDES, job.rows)
        if job.extra is not None:
            add(job.tensor, job, "rows", [job.extra], ("source_finetuned",))
    for t in plan.tensors:
        if t.check_sources_equal:
            add(t, t, "compare", t.segments, SIDES)
    return visits, roles


def _resolve(request: DiffExtractRequest, settings: EngineSettings) -> dict[str, ResolvedModel]:
    side = {"source_base": TOKENIZER_FILES, "source_finetuned": (*TOKENIZER_FILES, GENERATION_CONFIG)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {role: pool.submit(resolve_model, role, parse_uri(uri, field=role),
                                     endpoint_url=settings.s3_endpoint_url, max_header_bytes=settings.max_header_bytes,
                                     reads=remote_reads(settings), allowed_roots=request.allowed_roots,
                                     denied_roots=request.denied_roots, side_files=side[role],
                                     retry=storage_retry(settings)) for role, uri in request.inputs().items()}
        models, errors = {}, []
        for role, future in futures.items():
            try:
                models[role] = future.result()
            except BaseException as exc:
                errors.append(exc)
    if errors:
        close_models(models)
        raise errors[0]
    return models


def plan_extraction(models: dict[str, ResolvedModel]) -> Plan:
    """The graft's plan with the source base as the target: what the pair transfers is what the artifact holds."""
    base = models["source_base"]
    return build_plan(base, base, models["source_finetuned"], GraftOptions(vocab="extend"))


def _side_files(sink, models: dict[str, ResolvedModel]) -> list[FileRecord]:
    """What a graft takes from the fine-tune: its config (the stand-in's), tokenizer, chat template, generation
    config, as they are; and the base's tokenizer files under BASE_PREFIX, which an inspection compares with
    the target's."""
    finetuned, base = models["source_finetuned"], models["source_base"]
    records = [sink.put("config.json", finetuned.side_file("config.json"))]
    for name in (*finetuned.tokenizer_files(), GENERATION_CONFIG):
        if finetuned.store.exists(name):
            records.append(sink.put(name, finetuned.side_file(name)))
    for name in base.tokenizer_files():
        records.append(sink.put(BASE_PREFIX + name, base.side_file(name)))
    return records


def _recorded(model: ResolvedModel, files: dict) -> dict:
    return {"uri": model.uri, "revision": model.store.revision, "config": model.config, "files": files,
            "weight_files": model.weight_files,
            "tensors": {n: {"dtype": i.dtype, "shape": list(i.shape), "file": i.file, "start": i.start, "end": i.end}
                        for n, i in model.tensors.items()}}


def content_address(encoding: dict, shards: list[FileRecord], side: list[FileRecord]) -> str:
    """What identifies an artifact's content: its encoding and the digests of every file it holds."""
    body = {"format": FORMAT, "encoding": encoding, "shards": [[r.path, r.sha256] for r in shards],
            "side_files": sorted([r.path, r.sha256] for r in side)}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class DiffResult:
    output_uri: str
    manifest_uri: str
    manifest: dict


def extract_diff(request: DiffExtractRequest, settings: EngineSettings | None = None, *,
                 progress: Callable[[ExtractProgress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> DiffResult:
    settings = settings or EngineSettings()
    output = parse_uri(request.output, field="output")
    report = progress or (lambda p: None)
    report(ExtractProgress(Phase.RESOLVING))
    models = _resolve(request, settings)
    try:
        return _extract(request, models, output, settings, report, should_cancel)
    finally:
        close_models(models)


def _extract(request, models, output, settings, report, should_cancel) -> DiffResult:
    started = time.perf_counter()
    plan = plan_extraction(models)
    jobs = _jobs(plan, request.spec.encoding)
    visits, roles = _visits(plan, jobs)
    stores = {role: models[role].store for role in SIDES}
    reading = Reading(stores, canonical_roles(models), torch.device("cpu"), settings.block_bytes,
                      settings.prefetch_blocks, settings.io_threads, should_cancel)
    blocks = build_blocks([(None, visits)], settings.block_bytes, reading.canon)
    state = ExtractProgress(Phase.STREAMING, tensors_total=len(jobs),
                            bytes_total=sum(r[3] for b in blocks for r in b.reads))
    report(state)
    with (publishing(output, request, settings, should_cancel, manifest_name=DIFF_MANIFEST) as sink,
          InputHasher(models, settings.hash_inputs, settings.cache_dir or None) as hasher,
          ArtifactWriter(sink, request.spec.shard_size, settings.scratch_dir) as writer):
        side = _side_files(sink, models)
        visitor = _ExtractVisitor(writer, roles)
        for job in jobs:
            if not job.numel:  # nothing to stream (no rows shared): its encoder sees every pass empty
                _start(job, writer)
                for index in range(job.passes):
                    job.encoder.end_pass(index)
                visitor.encoded(job)

        def on_block(totals: PassTotals) -> None:
            state.bytes_read, state.tensors_done = totals.bytes_read, visitor.done
            report(state)

        totals = run_pass(blocks, reading, visitor, on_block=on_block)
        writer.flush()
        for job in jobs:
            job.entry.setdefault("shard", writer.placed.get(job.tensor.name, ""))
        state.phase = Phase.COMMITTING
        report(state)
        hasher.join()
        manifest = _manifest(request, models, hasher.result, plan, jobs, writer.records, side, visitor.changed)
        manifest["stats"] = {"seconds_total": round(time.perf_counter() - started, 3),
                             "seconds_streaming": round(totals.seconds, 3), "bytes_read": totals.bytes_read}
        manifest_uri = sink.commit(dumps(manifest))
    state.phase = Phase.DONE
    report(state)
    return DiffResult(str(output), manifest_uri, manifest)


def _manifest(request, models, files, plan, jobs, shards, side, changed) -> dict:
    encoding = request.spec.encoding.model_dump()
    tensors = {job.tensor.name: job.entry for job in jobs}
    delta_sq = sum(j.norms[0] for j in jobs)
    finetuned_bytes = sum(i.nbytes for i in models["source_finetuned"].tensors.values())
    encoded = sum(j.entry["encoded_bytes"] for j in jobs)
    errors = [j.entry["rel_frobenius"] for j in jobs if j.entry["rel_frobenius"] is not None]
    weighted = math.sqrt(sum((j.entry["rel_frobenius"] or 0.0) ** 2 * j.norms[0] for j in jobs) / delta_sq) \
        if delta_sq else 0.0
    return {
        "format": FORMAT,
        "engine": {"name": "graft", "version": ENGINE_VERSION, "torch": torch.__version__},
        "formula": "delta = source_finetuned - source_base (per tensor, in its compute dtype)",
        "encoding": encoding,
        "sources": {role: _recorded(models[role], files.get(role, {})) for role in SIDES},
        "tensors": tensors,
        "shards": [r.to_dict() for r in shards],
        "side_files": [r.to_dict() for r in side],
        "changed_buffers": changed,
        "warnings": plan.warnings,
        "source_only": plan.source_only,
        "totals": {"tensors": len(jobs), "stored": _count(jobs), "encoded_bytes": encoded,
                   "finetuned_bytes": finetuned_bytes,
                   "ratio_to_finetuned": round(finetuned_bytes / encoded, 3) if encoded else None,
                   "rel_frobenius": weighted, "rel_frobenius_max": max(errors, default=0.0),
                   "max_abs": max((j.entry["max_abs"] or 0.0 for j in jobs), default=0.0)},
        "content_address": content_address(encoding, shards, side),
    }


def _count(jobs: list[_Job]) -> dict[str, int]:
    out: dict[str, int] = {}
    for job in jobs:
        out[job.stored] = out.get(job.stored, 0) + 1
    return out
