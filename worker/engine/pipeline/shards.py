"""One graft split by output shard: planned once, each shard written by a task of its own (any process, any
host), then a finalize step writing the index, the side files and the manifest last.

The split's description (`plan_split`) is plain JSON: the service stores it with the job. Every task plans
again from the headers (cheap: no tensor data) and refuses to go on unless the inputs' identities (sizes,
ETags or mtimes, digests where known) and the plan's digest are the stored ones, so that all shards of one
output come from the same inputs and the same decisions. A shard's bytes depend only on the plan and the
inputs (DARE's draw is counter-based per tensor, TIES's statistics are per tensor and go with its shard): a
retried or duplicated task writes the same file, which lands whole (the sinks' `split="join"`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict

from worker.engine.compute.tensor_stats import TensorStats
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.phases import Phase
from worker.engine.pipeline.graft import (
    GraftResult,
    Progress,
    _checked_output,
    _checks_before_commit,
    _stream,
    _stream_stats,
    _write_side_files,
)
from worker.engine.pipeline.hooks import Hooks
from worker.engine.pipeline.manifest import build_manifest, dumps
from worker.engine.pipeline.publish import publishing, storage_retry
from worker.engine.pipeline.resolve import canonical_roles, close_models, pick_device, plan_graft
from worker.engine.planning.plan import Plan
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.input_hashes import InputHasher
from worker.engine.storage.local_files import LocalStore
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.sinks import FileRecord, open_sink
from worker.engine.storage.uris import parse_uri

SPLIT_FORMAT = "graft-split/1"


def _tensor_key(t) -> list:
    return [t.name, t.dtype, list(t.shape), t.action, [[s.op, s.start, s.stop] for s in t.segments],
            {r: [i.file, i.start, i.end, i.dtype, list(i.shape)] for r, i in sorted(t.sources.items())}]


def plan_digest(plan: Plan) -> str:
    """What every task's plan must agree on: each shard's tensors, how each is made and from which bytes, and
    the recipe's summary (not the memory bound: that is the worker's settings)."""
    shown = {k: v for k, v in plan.to_dict().items() if k != "memory"}
    body = {"plan": shown, "config": plan.config,
            "shards": [[s.file, [_tensor_key(t) for t in s.tensors]] for s in plan.shards]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def input_identities(models: dict[str, ResolvedModel]) -> dict[str, dict]:
    """Per distinct input, per file: what the store knows of its content without reading it (size, ETag,
    sha256), and a local file's mtime."""
    canon = canonical_roles(models)
    out: dict[str, dict] = {}
    for role, model in models.items():
        if canon[role] != role:
            continue
        store, files = model.store, {}
        for name in sorted(store.files):
            entry = dict(store.fingerprint(name))
            if isinstance(store, LocalStore):
                entry["mtime_ns"] = os.stat(store.path(name)).st_mtime_ns
            files[name] = entry
        out[role] = {"uri": model.uri, "revision": store.revision, "files": files}
    return out


def describe_split(plan: Plan, models: dict[str, ResolvedModel]) -> dict:
    """The split as the job stores it: JSON only."""
    return {"format": SPLIT_FORMAT, "digest": plan_digest(plan), "inputs": input_identities(models),
            "output_bytes": plan.output_bytes, "input_bytes": plan.input_bytes(), "tensors": len(plan.tensors),
            "shards": [{"file": s.file, "bytes": s.data_bytes, "tensors": len(s.tensors),
                        "input_bytes": sum(i.nbytes for t in s.tensors for i in t.sources.values())}
                       for s in plan.shards]}


def plan_split(request: GraftRequest, settings: EngineSettings) -> dict:
    plan, models = plan_graft(request, settings)
    try:
        return describe_split(plan, models)
    finally:
        close_models(models)


def check_split(split: dict, plan: Plan, models: dict[str, ResolvedModel]) -> None:
    """A task's own plan against the stored one: `input_changed` when an input is not the one planned from,
    `plan_changed` when the same inputs plan differently (a worker of another version)."""
    if split.get("format") != SPLIT_FORMAT:
        raise GraftError("plan_changed", f"the stored split is {split.get('format')!r}, this worker reads "
                         f"{SPLIT_FORMAT}")
    now = input_identities(models)
    for role, held in split["inputs"].items():
        seen = now.get(role)
        if seen is None or seen["files"] != held["files"] or seen["revision"] != held["revision"]:
            changed = sorted(n for n in set(held["files"]) | set((seen or {}).get("files", {}))
                             if (seen or {}).get("files", {}).get(n) != held["files"].get(n))
            raise GraftError("input_changed", f"{role} ({held['uri']}) changed since the job was planned: "
                             f"{', '.join(changed[:5]) or 'its revision'}; resubmit the job")
    if plan_digest(plan) != split["digest"]:
        raise GraftError("plan_changed", "this worker plans the job differently from the one that split it "
                         "(another engine version?)")


def claim_split(request: GraftRequest, settings: EngineSettings) -> None:
    """Claim the output for the job's tasks (what one-task grafts do when their sink opens), and let go."""
    output = parse_uri(request.output, field="output")
    _open(output, request, settings, "claim").detach()


def discard_split(request: GraftRequest, settings: EngineSettings) -> None:
    """Remove everything the job's tasks wrote and its claim: a cancelled or failed split graft leaves nothing."""
    output = parse_uri(request.output, field="output")
    _open(output, request, settings, "claim").abort()


def _open(output, request: GraftRequest, settings: EngineSettings, split: str):
    return open_sink(output, endpoint_url=settings.s3_endpoint_url, part_bytes=settings.s3_part_bytes,
                     parts_in_flight=settings.s3_parts_in_flight, writer=request.writer,
                     allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                     retry=storage_retry(settings), split=split)


def _sub_plan(plan: Plan, index: int) -> Plan:
    shard = plan.shards[index]
    return Plan(list(shard.tensors), [shard], [], [], plan.config, plan.tied_output, plan.vocab, plan.merge,
                plan.memory)


def run_shard(request: GraftRequest, split: dict, index: int, settings: EngineSettings, hooks: Hooks) -> dict:
    """Write output shard `index` (reading only the ranges its tensors need); returns what finalize needs of it
    (JSON: the file's record, its tensors' statistics, its late warnings, bytes moved)."""
    output = parse_uri(request.output, field="output")
    hooks.progress(Progress(Phase.RESOLVING))
    plan, models = plan_graft(request, settings)
    try:
        check_split(split, plan, models)
        if not 0 <= index < len(plan.shards):
            raise GraftError("plan_changed", f"shard {index} is not in the plan ({len(plan.shards)} shards)")
        sub = _sub_plan(plan, index)
        total = Progress(Phase.STREAMING, tensors_total=len(sub.tensors), bytes_total=sub.output_bytes)
        t0 = time.perf_counter()
        with publishing(output, request, settings, hooks.should_cancel, split="join") as sink:
            hooks.progress(total)
            records, stats, late, totals = _stream(request, sub, models, sink, pick_device(request.options.device),
                                                   settings, hooks, total)
            sink.staged()  # an S3 shard's completion runs on the sink's threads: done before it is reported
            sink.detach()
        merge = {t.name: plan.merge.tensor_report(t.name) for t in sub.tensors} if plan.merge is not None else {}
        return {"index": index, "file": records[0].to_dict(), "stats": {n: asdict(s) for n, s in stats.items()},
                "merge": merge,
                "warnings": late, "bytes_read": total.bytes_read, "bytes_written": total.bytes_written,
                "seconds": round(time.perf_counter() - t0, 3), "compute_s": round(totals.compute_s, 3)}
    finally:
        close_models(models)


def finalize_split(request: GraftRequest, split: dict, shards: list[dict], settings: EngineSettings,
                   hooks: Hooks) -> GraftResult:
    """After every shard: the side files, the index, the checks on the staged output, the manifest last."""
    output = parse_uri(request.output, field="output")
    started = time.perf_counter()
    plan, models = plan_graft(request, settings, side_files=True)
    try:
        check_split(split, plan, models)
        by_index = {s["index"]: s for s in shards}
        if sorted(by_index) != list(range(len(plan.shards))):
            raise GraftError("internal_error", f"finalize found {len(by_index)} of {len(plan.shards)} shards")
        done = [by_index[i] for i in range(len(plan.shards))]
        records = [FileRecord(**s["file"]) for s in done]
        if [r.path for r in records] != [s.file for s in plan.shards]:
            raise GraftError("plan_changed", "the shards written are not the plan's")
        stats = {n: TensorStats(**st) for s in done for n, st in s["stats"].items()}
        if plan.merge is not None:
            plan.merge = _Reported(plan.merge, {n: r for s in done for n, r in s["merge"].items()})
        return _finalize(request, plan, models, output, records, stats, done, settings, hooks, started)
    finally:
        close_models(models)


def _finalize(request: GraftRequest, plan: Plan, models: dict[str, ResolvedModel], output, records, stats,
              done: list[dict], settings: EngineSettings, hooks: Hooks, started: float) -> GraftResult:
    source_only = [{"code": "source_only", "tensor": d["tensor"],
                    "message": f"{d['tensor']} is only in {', '.join(d['in'])}; not in the output"}
                   for d in plan.source_only]
    for w in plan.warnings + source_only:
        hooks.warn(w)
    total = Progress(Phase.COMMITTING, len(plan.tensors), len(plan.tensors), sum(s["bytes_read"] for s in done),
                     sum(s["bytes_written"] for s in done), plan.output_bytes)
    with (publishing(output, request, settings, hooks.should_cancel, split="join") as sink,
          InputHasher(models, settings.hash_inputs, settings.cache_dir or None) as hasher):
        side_records = _write_side_files(sink, request, models, plan)
        late_warnings = [w for s in done for w in s["warnings"]]
        connectivity = _checked_output(plan, stats, hooks, late_warnings)
        checks = _checks_before_commit(sink, models, records, hooks, total, late_warnings)
        hooks.progress(total)
        hasher.join()
        if hasher.error is not None:
            raise GraftError("storage_error", f"hashing the inputs failed: {hasher.error}")
        warnings = plan.warnings + source_only + late_warnings
        totals = _Totals(sum(s["compute_s"] for s in done))
        run_stats = {"device": str(pick_device(request.options.device)),
                     "seconds_total": round(time.perf_counter() - started, 3),
                     **_stream_stats(total, totals, sum(s["seconds"] for s in done)),
                     "tensors": len(plan.tensors), "connectivity": connectivity,
                     "split": {"shards": len(done), "task_seconds": [s["seconds"] for s in done]}}
        manifest = build_manifest(request, models, hasher.result, plan, records + side_records, stats, warnings,
                                  run_stats, str(output))
        manifest.update(checks)
        manifest_uri = sink.commit(dumps(manifest))
    total.phase = Phase.DONE
    hooks.progress(total)
    return GraftResult(str(output), manifest_uri, records + side_records, manifest, warnings, checks)


class _Totals:
    """The compute pass's totals as _stream_stats reads them, summed over the shard tasks (their waits are
    each task's own and not added up)."""

    def __init__(self, compute_s: float) -> None:
        self.compute_s, self.wait_read_s, self.wait_write_s = compute_s, 0.0, 0.0


class _Reported:
    """The recipe's merge context with each tensor's report as its shard task made it (what the compute pass
    counted there: kept fractions, sign agreement), for the manifest."""

    def __init__(self, merge, reports: dict[str, dict | None]) -> None:
        self._merge, self._reports = merge, reports

    def __getattr__(self, name: str):
        return getattr(self._merge, name)

    def tensor_report(self, name: str) -> dict | None:
        return self._reports.get(name)
