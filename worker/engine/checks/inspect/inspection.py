"""`inspect_graft`: the levels asked for, one after another, into one report and its artifacts.

    headers (always) -> weights (one streaming pass) -> function (the loss along source_base -> target_base)

A graft that cannot be planned (shapes that disagree, say) is a headers-level `incompatible` reason, not an
exception: the report says why, and the levels that need the plan are skipped. Errors that leave nothing
to report (an input that does not exist, a cancelled job) are raised as they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.engine.checks.inspect.chart import layers_png
from worker.engine.checks.inspect.estimates import estimate
from worker.engine.checks.inspect.headers import diff_roles, inspect_headers
from worker.engine.checks.inspect.weights import nonfinite_reason_names, summarize, weights_pass
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.pipeline.graft import Phase, Progress
from worker.engine.pipeline.manifest import json_safe
from worker.engine.pipeline.resolve import canonical_roles, close_models, pick_device, plan_models, resolve_inputs
from worker.engine.planning.plan import Plan
from worker.engine.planning.request import GraftRequest
from worker.engine.storage.model import ResolvedModel
from worker.engine.verdict import Level, combine, function_reasons, levels_up_to, reason, weights_reasons

# function_probe's refusals of bases whose interpolation is not defined: the headers level already says why
# (with its own verdict); the report says the function level did not run. Its other errors (model_too_large,
# eval_timeout, no_tokenizer) fail the inspection: that level was asked for and cannot be given.
# diff_source_unavailable: a diff artifact's recorded source base cannot be read (its delta alone cannot be run).
UNDEFINED_PROBE = frozenset({"architecture_mismatch", "shape_conflict", "config_mismatch", "diff_source_unavailable"})
# The phase the weights pass reports its bytes under (bytes_read against bytes_total; nothing is written).
WEIGHTS_PHASE = Phase.INSPECTING


@dataclass
class InspectResult:
    report: dict
    artifacts: dict[str, bytes]  # "report.json", and "layers.png" when the weights level ran

    @property
    def verdict(self) -> str:
        return self.report["verdict"]


def inspect_graft(request: GraftRequest, *, level: Level | str, settings: EngineSettings | None = None,
                  probe_text: str | None = None, should_cancel: Callable[[], bool] | None = None,
                  progress: Callable[[Progress], None] | None = None) -> InspectResult:
    """Inspect the graft `request` describes (its output is neither read nor written) up to `level`."""
    level = Level(level)
    settings = settings or EngineSettings()
    report = progress or (lambda p: None)
    started = time.perf_counter()
    report(Progress(Phase.RESOLVING))
    models = resolve_inputs(request, settings)
    try:
        out, artifacts = _inspect(request, level, models, settings, probe_text, should_cancel, report)
    finally:
        close_models(models)
    out["seconds"] = round(time.perf_counter() - started, 3)
    out = json_safe(out)
    artifacts["report.json"] = (json.dumps(out, indent=2, allow_nan=False) + "\n").encode()
    report(Progress(Phase.DONE))
    return InspectResult(out, artifacts)


def headers_verdict(request: GraftRequest, models: dict[str, ResolvedModel], plan: Plan) -> dict:
    """The header-level verdict of a planned graft (what `--dry-run` and the API's preview show beside the
    plan): no weights read."""
    _details, reasons = inspect_headers(request, models, plan, None)
    verdict, reasons = combine(reasons, [Level.HEADERS])
    return json_safe({"level": str(Level.HEADERS), "verdict": str(verdict), "reasons": reasons})


def _s3_output(request: GraftRequest) -> bool:
    """Whether the graft's output holds upload parts in memory (S3's count in the estimate); none given: local."""
    from worker.engine.storage import schemes
    from worker.engine.storage.uris import parse_uri

    try:
        return bool(request.output) and schemes.get(parse_uri(request.output, field="output").scheme).upload_parts
    except GraftError:
        return False


def plan_or_error(request: GraftRequest, models: dict[str, ResolvedModel],
                  settings: EngineSettings) -> tuple[Plan | None, GraftError | None]:
    """run.plan_graft's planning on models already resolved, its refusal returned rather than raised."""
    try:
        plan = plan_models(request, models, settings)
    except GraftError as err:
        return None, err
    return plan, None


def _inspect(request: GraftRequest, level: Level, models: dict[str, ResolvedModel], settings: EngineSettings,
             probe_text: str | None, should_cancel, report) -> tuple[dict, dict[str, bytes]]:
    plan, plan_error = plan_or_error(request, models, settings)
    headers, reasons = inspect_headers(request, models, plan, plan_error)
    canon = canonical_roles(models)
    out: dict = {"verdict": None, "reasons": [], "level": str(level), "levels_run": [str(Level.HEADERS)],
                 "headers": headers,
                 "estimates": estimate(plan, settings, canon, s3_output=_s3_output(request))
                 if plan is not None else {}}
    artifacts: dict[str, bytes] = {}
    wanted = levels_up_to(level)
    skipped = {"skipped": f"the graft cannot be planned ({plan_error.code})"} if plan_error else None
    if Level.FUNCTION in wanted and plan is not None:
        _function_fits(request, models, settings)  # refused now, before the weights pass's cost
    if Level.WEIGHTS in wanted:
        if plan is None:
            out["weights"] = skipped
        else:
            out["weights"], more, artifacts["layers.png"] = _weights(request, plan, models, canon, settings,
                                                                     should_cancel, report)
            reasons += more
            out["levels_run"].append(str(Level.WEIGHTS))
    if Level.FUNCTION in wanted:
        if plan is None:
            out["function"] = skipped
        else:
            out["function"], more = _function(request, models, settings, probe_text, should_cancel)
            reasons += more
            if "skipped" not in out["function"]:
                out["levels_run"].append(str(Level.FUNCTION))
    verdict, out["reasons"] = combine(reasons, out["levels_run"])
    out["verdict"] = str(verdict)
    return out, artifacts


def _weights(request: GraftRequest, plan: Plan, models: dict[str, ResolvedModel], canon: dict[str, str],
             settings: EngineSettings, should_cancel, report) -> tuple[dict, list[dict], bytes]:
    def on_block(totals) -> None:
        report(Progress(WEIGHTS_PHASE, totals.tensors_done, totals.tensors_total, totals.bytes_read, 0,
                        totals.bytes_total))

    if should_cancel is not None and should_cancel():
        raise GraftCancelled()
    report(Progress(WEIGHTS_PHASE))
    stores = {role: m.store for role, m in models.items()}
    sums, totals = weights_pass(plan, stores, canon, block_bytes=settings.block_bytes,
                                prefetch=settings.prefetch_blocks, io_threads=settings.io_threads,
                                should_cancel=should_cancel, on_block=on_block)
    roles = diff_roles(request)
    diffs = summarize(plan, sums, len(roles), models["target_base"])
    several = len(roles) > 1
    reasons = []
    for (index, b, f), entry in zip(roles, diffs, strict=True):
        entry["source_base"], entry["source_finetuned"] = models[b].uri, models[f].uri
        label = f"diff {index}" if several else ""
        medians = entry["medians"]
        reasons += weights_reasons(bases_distance_ratio=medians["bases_distance_ratio"],
                                   cos_bases_delta=medians["cos_bases_delta"],
                                   coverage=entry["coverage"]["share"], label=label,
                                   index=index if several else None)
        if entry["nonfinite_tensors"]:
            names = entry["nonfinite_tensors"]
            reasons.append(reason("nonfinite_inputs", Level.WEIGHTS, "incompatible",
                                  f"NaN or Inf in the inputs of {len(names)} tensor(s)"
                                  f"{' (' + label + ')' if label else ''}: {nonfinite_reason_names(names)}; the "
                                  "graft would fail with nonfinite_output", values={"tensors": len(names)}))
    section = {"bytes_read": totals.bytes_read, "bytes_total": totals.bytes_total, "tensors": totals.tensors_total,
               "seconds": round(totals.seconds, 3), "computing_s": round(totals.compute_s, 3),
               "waiting_reads_s": round(totals.wait_read_s, 3), "diffs": diffs}
    return section, reasons, layers_png(diffs)


def _bases(request: GraftRequest, models: dict[str, ResolvedModel]) -> list[tuple[ResolvedModel, list[int]]]:
    """Each distinct source base and the diffs that take it: one probe per base."""
    out: dict[int, tuple[ResolvedModel, list[int]]] = {}
    for index, b, _f in diff_roles(request):
        out.setdefault(id(models[b]), (models[b], []))[1].append(index)
    return list(out.values())


def _tokenizer_from(models: dict[str, ResolvedModel]) -> ResolvedModel:
    """The bases are probed on one tokenization: the target's, else the source base's, else the fine-tune's."""
    for role in ("target_base", "source_base", "source_finetuned"):
        if models[role].tokenizer_files():
            return models[role]
    return models["target_base"]  # function_probe refuses it with no_tokenizer


def _function_fits(request: GraftRequest, models: dict[str, ResolvedModel], settings: EngineSettings) -> None:
    """The function level's memory refusal (model_too_large), before anything is read."""
    try:
        from worker.engine.checks.evaluation.loading import check_fits
    except ImportError:  # the probe itself checks again
        return
    device = pick_device(request.options.device).type
    for base, _diffs in _bases(request, models):
        check_fits([base, models["target_base"]], settings, device=device, what="function-level probe")


def _recorded_base(base: ResolvedModel, request: GraftRequest, settings: EngineSettings) -> ResolvedModel | None:
    """A diff artifact's source base, from the URI it records: the probe runs the base's weights (GraftError
    diff_source_unavailable naming it when it cannot be read: the function level is not run for that diff)."""
    from worker.engine.diffs.artifact import recorded_model
    from worker.engine.pipeline.publish import storage_retry
    from worker.engine.pipeline.resolve import remote_reads

    try:
        return recorded_model(base, "source_base", endpoint_url=settings.s3_endpoint_url,
                              max_header_bytes=settings.max_header_bytes, reads=remote_reads(settings),
                              allowed_roots=request.allowed_roots, denied_roots=request.denied_roots,
                              retry=storage_retry(settings))
    except GraftError as err:
        raise GraftError("diff_source_unavailable", err.message) from None


def _function(request: GraftRequest, models: dict[str, ResolvedModel], settings: EngineSettings,
              probe_text: str | None, should_cancel) -> tuple[dict, list[dict]]:
    from worker.engine.checks.evaluation import isolation

    device = pick_device(request.options.device).type
    probes, reasons = [], []
    bases = _bases(request, models)
    for base, diffs in bases:
        real = None
        try:
            real = _recorded_base(base, request, settings)
            result = isolation.probe(real or base, models["target_base"], _tokenizer_from(models), text=probe_text,
                                     settings=settings, device=device, should_cancel=should_cancel,
                                     roots=(request.allowed_roots, request.denied_roots))
        except GraftError as err:
            if err.code not in UNDEFINED_PROBE:
                raise
            # This base's weights reasons stand; the other bases are still probed.
            probes.append({"skipped": err.message, "error": err.to_dict(), "source_base": base.uri, "diffs": diffs})
            reasons.append(reason("function_level_not_run", Level.FUNCTION, "compatible",
                                  f"the function level was not run: {err.message}", values={"diff_indices": diffs}))
            continue
        finally:
            if real is not None:
                real.store.close()
        probes.append({"source_base": base.uri, "diffs": diffs, **result})
        for r in function_reasons(result):
            r["values"]["diff_indices"] = diffs  # the diffs whose weights reasons this probe may overrule
            if len(bases) > 1:
                r["message"] += f" (source base of diff(s) {', '.join(map(str, diffs))})"
            reasons.append(r)
    ran = [p for p in probes if "skipped" not in p]
    section = dict(ran[0]) if ran else dict(probes[0])
    if len(probes) > 1:
        section["probes"] = probes
    return section, reasons
