"""One graft, start to end: resolve -> plan -> stream -> write -> commit."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.engine.compute.passes import Reading
from worker.engine.compute.stream import StreamTotals, stream_plan
from worker.engine.compute.tensor_stats import TensorStats, connectivity_medians
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.phases import Phase
from worker.engine.pipeline.hooks import BeforeCommit, Hooks
from worker.engine.pipeline.manifest import build_manifest, dumps, model_card
from worker.engine.pipeline.publish import publishing
from worker.engine.pipeline.resolve import (
    canonical_roles,
    close_models,
    pick_device,
    plan_graft,
    resolve_inputs,
    tokenizer_donor,
)
from worker.engine.planning.plan import Plan
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.input_hashes import InputHasher
from worker.engine.storage.model import GENERATION_CONFIG, INDEX_FILE, ResolvedModel
from worker.engine.storage.sinks import MANIFEST, FileRecord, Sink
from worker.engine.storage.trace import mark, tracing
from worker.engine.storage.uris import parse_uri

log = logging.getLogger("graft.engine")


@dataclass
class Progress:
    phase: Phase
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_total: int = 0

    @property
    def fraction(self) -> float:
        if not self.bytes_total:
            return 0.0
        # An inspection writes nothing: how far it is, is how much of its input it has read.
        done = self.bytes_read if self.phase == Phase.INSPECTING else self.bytes_written
        return done / self.bytes_total


@dataclass
class GraftResult:
    output_uri: str
    manifest_uri: str
    files: list[FileRecord]
    manifest: dict
    warnings: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # what before_commit added to the manifest (an evaluation)

    @property
    def stats(self) -> dict:
        return self.manifest["stats"]


def _side_files(models: dict[str, ResolvedModel], plan: Plan, donor: str) -> list[tuple[str, bytes]]:
    """config from the target; tokenizer, chat template and generation config from the donor (the fine-tune,
    or the target under mergekit's conventions), else from the other. Fetched while resolving, but for the
    fallback's tokenizer (a donor without one), read here, all at once."""
    first = models[donor]
    second = models["target_base" if donor == "source_finetuned" else "source_finetuned"]
    files = [("config.json", (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode())]
    tokenizer_from = first if first.tokenizer_files() else second
    names = tokenizer_from.tokenizer_files()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        files += zip(names, pool.map(tokenizer_from.side_file, names), strict=True)
    for model in (first, second):
        if model.store.exists(GENERATION_CONFIG):
            files.append((GENERATION_CONFIG, model.side_file(GENERATION_CONFIG)))
            break
    return files


def _write_side_files(sink: Sink, request: GraftRequest, models: dict[str, ResolvedModel],
                      plan: Plan) -> list[FileRecord]:
    """Everything but the shards and the manifest, known from the plan: written before the shards stream
    (an S3 sink uploads them on its own threads), so that the end of a graft is the shards' last parts,
    their completion and the manifest."""
    records = []
    if len(plan.shards) > 1:
        records.append(sink.put(INDEX_FILE, _index(plan)))
    for name, data in _with_chat_template(_side_files(models, plan, tokenizer_donor(request)), request):
        records.append(sink.put(name, data))
    records.append(sink.put("README.md", model_card(request, plan).encode()))
    return records


def _with_chat_template(files: list[tuple[str, bytes]], request: GraftRequest) -> list[tuple[str, bytes]]:
    """A recipe's chat template as chat_template.jinja, which transformers reads over tokenizer_config.json's;
    the donor's own template files give way to it."""
    template = request.recipe.chat_template
    if template is None:
        return files
    kept = [(n, d) for n, d in files if n not in ("chat_template.jinja", "chat_template.json")]
    return [*kept, ("chat_template.jinja", template.encode())]


def _connectivity(plan: Plan, stats: dict[str, TensorStats]) -> dict:
    """Whole-model proxies over the transferred tensors (tensor_stats.connectivity_medians, as the inspection
    reports them): how far apart the bases are, relative to the target and to the fine-tune's diff, and how
    the bases' difference lines up with the diff."""
    medians = connectivity_medians([(t.shape, stats[t.name]) for t in plan.tensors if t.action != "copied"])
    return {name: round(value, 6) for name, value in medians.items() if name != "tensors" and value is not None}


def connectivity_warnings(connectivity: dict) -> list[dict]:
    """The weights level's connectivity reasons (graft inspect's rules, worker/engine/verdict.py), as
    the graft's `weak_connectivity` warnings: the same thresholds whether one inspects or grafts."""
    from worker.engine.verdict import weights_reasons

    reasons = weights_reasons(bases_distance_ratio=connectivity.get("bases_distance_ratio"),
                              cos_bases_delta=connectivity.get("cos_bases_delta"), coverage=None)
    return [{"code": "weak_connectivity", "reason": r["code"], "verdict": r["verdict"],
             "message": f"{r['message']}; transfer helps when the target continues the source base's training "
                        "(graft inspect --level function measures it)"} for r in reasons]


def _index(plan: Plan) -> bytes:
    weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
    index = {"metadata": {"total_size": plan.output_bytes},
             "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode()


def run_graft(request: GraftRequest, *, settings: EngineSettings | None = None,
              progress: Callable[[Progress], None] | None = None,
              should_cancel: Callable[[], bool] | None = None,
              warn: Callable[[dict], None] | None = None,
              before_commit: BeforeCommit | None = None) -> GraftResult:
    """`before_commit(staged, models, shards)`: called once every output file is written and before the
    manifest is, with where the output can be read back and the shards' records; the sections it returns go
    into the manifest (an evaluation). What it raises fails the graft like any other error: nothing is
    published."""
    settings = settings or EngineSettings()
    output = parse_uri(request.output, field="output")
    device = pick_device(request.options.device)
    report = progress or (lambda p: None)
    report(Progress(Phase.RESOLVING))
    with tracing(settings.trace) as rec:
        t0 = time.perf_counter()
        plan, models = plan_graft(request, settings, side_files=True)
        resolve_seconds = time.perf_counter() - t0
        mark("resolved")
        try:
            hooks = Hooks(settings, report, should_cancel, warn or (lambda w: None), before_commit)
            return _run_planned(request, plan, models, output, device, settings, hooks, resolve_seconds)
        finally:
            close_models(models)
            if rec is not None:
                rec.mark("end")


def _statistics_pass(plan: Plan, reading: Reading, hooks: Hooks, total: Progress) -> int:
    """A recipe's whole-tensor statistics (as many reads of the diffs concerned as its methods need) before the
    compute pass; progress names the pass, so that an ETA taken from the compute pass alone is not misread."""
    if plan.merge is None or not plan.merge.passes():
        return 0
    from worker.engine.compute.statistics_pass import statistics_passes

    phase = Progress(Phase.STATISTICS, tensors_total=total.tensors_total, bytes_total=total.bytes_total)
    hooks.progress(phase)

    def on_pass(index: int, passes: int, done: int, blocks: int) -> None:
        phase.bytes_written = int(total.bytes_total * (index + done / blocks) / passes)  # through all passes
        hooks.progress(phase)

    read = statistics_passes(plan, reading, on_pass)
    hooks.progress(total)  # back to streaming
    return read


def _run_planned(request: GraftRequest, plan: Plan, models: dict[str, ResolvedModel], output, device,
                 settings: EngineSettings, hooks: Hooks, resolve_seconds: float) -> GraftResult:
    started = time.perf_counter()
    source_only = [{"code": "source_only", "tensor": d["tensor"],
                    "message": f"{d['tensor']} is only in {', '.join(d['in'])}; not in the output"}
                   for d in plan.source_only]
    for w in plan.warnings + source_only:
        hooks.warn(w)
    total = Progress(Phase.STREAMING, tensors_total=len(plan.tensors), bytes_total=plan.output_bytes)
    # A recipe's statistics pass runs first: a job's events must not say streaming before it has begun.
    statistics_first = plan.merge is not None and bool(plan.merge.passes())
    hooks.progress(Progress(Phase.STATISTICS, tensors_total=total.tensors_total, bytes_total=total.bytes_total)
                 if statistics_first else total)
    with (publishing(output, request, settings, hooks.should_cancel) as sink,
          InputHasher(models, settings.hash_inputs, settings.cache_dir or None) as hasher):
        mark("output claimed")
        side_records = _write_side_files(sink, request, models, plan)
        t0 = time.perf_counter()
        mark("stream start")
        records, stats, late_warnings, totals = _stream(request, plan, models, sink, device, settings, hooks, total)
        stream_seconds = time.perf_counter() - t0
        mark("stream end")
        connectivity = _checked_output(plan, stats, hooks, late_warnings)
        checks = _checks_before_commit(sink, models, records, hooks, total, late_warnings)
        total.phase = Phase.COMMITTING
        hooks.progress(total)
        records += side_records
        hasher.join()
        if hasher.error is not None:
            raise GraftError("storage_error", f"hashing the inputs failed: {hasher.error}")
        warnings = plan.warnings + source_only + late_warnings
        run_stats = {"device": str(device), "seconds_total": round(time.perf_counter() - started, 3),
                     "seconds_resolving": round(resolve_seconds, 3), **_stream_stats(total, totals, stream_seconds),
                     "tensors": len(plan.tensors), "connectivity": connectivity}
        manifest = build_manifest(request, models, hasher.result, plan, records, stats, warnings, run_stats,
                                  str(output))
        manifest.update(checks)
        mark("commit")
        manifest_uri = sink.commit(dumps(manifest))
    total.phase = Phase.DONE
    hooks.progress(total)
    return GraftResult(str(output), manifest_uri, records, manifest, warnings, checks)


def _checked_output(plan: Plan, stats: dict[str, TensorStats], hooks: Hooks, late_warnings: list[dict]) -> dict:
    """After the compute pass, before anything is committed: the connectivity proxies (and their warnings, added
    to `late_warnings`), no NaN or Inf in any output tensor, no cancel since."""
    connectivity = _connectivity(plan, stats)
    late_warnings += connectivity_warnings(connectivity)
    for w in late_warnings:
        hooks.warn(w)
    nonfinite = [name for name, st in stats.items() if st.nonfinite]
    if nonfinite:
        raise GraftError("nonfinite_output", f"NaN or Inf in {len(nonfinite)} output tensor(s): "
                         + ", ".join(nonfinite[:20]), {"tensors": nonfinite})
    if hooks.should_cancel is not None and hooks.should_cancel():
        raise GraftCancelled()
    return connectivity


def _stream(request: GraftRequest, plan: Plan, models: dict[str, ResolvedModel], sink: Sink, device,
            settings: EngineSettings, hooks: Hooks, total: Progress):
    """The statistics pass (a recipe's thresholds) and the compute pass; `total` follows both."""
    def on_block(totals: StreamTotals) -> None:
        total.tensors_done, total.bytes_read, total.bytes_written = (
            totals.tensors_done, totals.bytes_read, totals.bytes_written)
        hooks.progress(total)

    reading = Reading({role: m.store for role, m in models.items()}, canonical_roles(models), device,
                      settings.block_bytes, settings.prefetch_blocks, settings.io_threads, hooks.should_cancel)
    stats_read = _statistics_pass(plan, reading, hooks, total)
    out = stream_plan(plan, sink, reading, alpha=request.options.alpha, on_block=on_block)
    total.bytes_read += stats_read
    # A diff artifact's decoded bytes were counted as read: count what was read of the artifact instead.
    stores = {id(m.store): m.store for m in models.values()}.values()
    total.bytes_read += sum(s.io_adjustment() for s in stores if hasattr(s, "io_adjustment"))
    return out.records, out.stats, out.changed_buffers, out.totals


def _stream_stats(total: Progress, totals: StreamTotals, seconds: float) -> dict:
    return {"seconds_streaming": round(seconds, 3), "bytes_read": total.bytes_read,
            "bytes_written": total.bytes_written,
            "input_gb_per_s": round(total.bytes_read / seconds / 1e9, 3) if seconds else None,
            "compute_thread": {"computing_s": round(totals.compute_s, 3),
                               "waiting_reads_s": round(totals.wait_read_s, 3),
                               "waiting_writer_s": round(totals.wait_write_s, 3)}}


def _checks_before_commit(sink: Sink, models: dict[str, ResolvedModel], records: list[FileRecord], hooks: Hooks,
                          total: Progress, late_warnings: list[dict]) -> dict:
    """The caller's before_commit on the staged output: the manifest sections it returns; its warnings (a
    quality warning) are events now and in the manifest."""
    if hooks.before_commit is None:
        return {}
    hooks.progress(Progress(Phase.EVALUATING, total.tensors_done, total.tensors_total, total.bytes_read,
                          total.bytes_written, total.bytes_total))
    checks = dict(hooks.before_commit(sink.staged(), models, list(records)) or {})
    for w in checks.pop("warnings", []):
        late_warnings.append(w)
        hooks.warn(w)
    return checks

__all__ = ["GraftResult", "Phase", "Progress", "plan_graft", "run_graft", "resolve_inputs", "MANIFEST"]
