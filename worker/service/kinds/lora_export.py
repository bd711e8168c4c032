"""The LoRA export kind: the transfer written as a PEFT adapter for the target (worker/engine/pipeline/
lora_export.py), submitted at POST /v1/loras. A succeeded export is an adapter of the tenant's
(worker/service/loras.py: GET/DELETE /v1/loras/{id}); its job record holds the manifest's summary (rank, totals,
the modules grouped by their name across layers, what was left out), the per-module table stays in
lora-manifest.json.

The body is the engine's request model, `LoraExport`, field for field (read from the model: a field added there
is in the API, its schema and the job record with no edit here), with what every submission holds; only the
inputs take the API's URI forms (`diff` also a diff's id, as graft jobs take it) and `output` is the
submission's (the tenant's namespace by default). The model's own rules (one source, rank or energy, an RE2
pattern) run in `check`, so that a refusal names its field."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, create_model

from worker.engine.errors import GraftError
from worker.engine.phases import Phase
from worker.engine.pipeline.lora_request import LoraExport, vllm_rank
from worker.service.kinds.bodies import DIFF_REF_FIELD, URI_FIELD, BodyError, Submission
from worker.service.kinds.kind import Progress, Route
from worker.service.loras import INPUTS, LORAS
from worker.service.settings import Settings

NAME = "lora_export"
COLLECTION = LORAS.name
ROUTE = Route("/loras", "lora", "Export a LoRA adapter",
              "A job of its own kind, run by the workers and polled at /v1/jobs/{id} (the Location header): the "
              "transfer (source pair, or a diff artifact by its id or URI) factored into a LoRA adapter for the "
              "target, written as PEFT writes one (adapter_config.json, adapter_model.safetensors) with "
              "lora-manifest.json last. Once it succeeded, the job's id is the adapter's: GET /v1/loras/{id}, "
              "DELETE /v1/loras/{id}.")
# The request's parameters: every field of the engine's model but the inputs and where it writes.
PARAMETERS = tuple(n for n in LoraExport.model_fields if n not in (*INPUTS, "output"))


def _one_source(schema: dict) -> None:
    """The adapter's delta comes one way of two, a source pair or a diff artifact (the schema says so; `check`
    holds the same through the model's own rule)."""
    def given(*names: str) -> dict:  # present and not null
        return {"required": list(names), "properties": {n: {"type": "string"} for n in names}}

    schema["anyOf"] = [{**given("source_base", "source_finetuned"), "not": given("diff")},
                       {**given("diff"), "not": {"anyOf": [given("source_base"), given("source_finetuned")]}}]


class _LoraBody(Submission):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_source)


def _input_field(name: str) -> tuple[Any, Any]:
    """An input of the model, with the API's URI forms (a diff's id too, for `diff`) and the model's description."""
    info = LoraExport.model_fields[name]
    form = DIFF_REF_FIELD if name == "diff" else URI_FIELD
    # a diff's own description says it all (an id, or a URI); a model's says what it is for, then the forms
    described = {**form, "description": f"{info.description}: {form['description']}" if info.description
                 and name != "diff" else form["description"]}
    if info.is_required():
        return str, Field(**described)
    return str | None, Field(info.default, **described)


def _body_fields() -> dict[str, tuple[Any, Any]]:
    return {name: _input_field(name) if name in INPUTS else (info.annotation, info)
            for name, info in LoraExport.model_fields.items() if name != "output"}


LoraCreate = create_model("LoraCreate", __base__=_LoraBody, __module__=__name__,
                          __doc__="A LoRA export: where the delta comes from, the target it is for, the adapter's "
                                  "rank and profile, and what every submission holds.", **_body_fields())
Body = LoraCreate


def engine_spec(body: Submission) -> LoraExport:
    """The body as the engine's model, its rules checked (raises pydantic's ValidationError). The output is the
    job's, unknown before its id: any placeholder passes the model's check of it."""
    fields = body.model_dump(include=set(LoraExport.model_fields) - {"output"})
    return LoraExport.model_validate({**fields, "output": body.output or "output"})


_WORD = re.compile(r"[a-z_]+")


def check(body: Submission) -> None:
    """The model's rules that no schema states, refused as a 422 naming the field: the field pydantic names, or
    else the first of the model's fields the message names (`give rank or energy, not both`: rank)."""
    try:
        spec = engine_spec(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(p) for p in error["loc"]) or next(
            (w for w in _WORD.findall(message) if w in LoraExport.model_fields), "body")
        raise BodyError(field, message.removeprefix(f"{field}: "), "invalid_option") from None
    if spec.profile == "vllm" and isinstance(spec.rank, int):
        try:  # vLLM's ranks end at 512: refused here rather than by a failed job (a rule between two fields)
            vllm_rank(spec.rank)
        except GraftError as err:
            raise BodyError("rank", f"{err.message}: give a smaller rank, or profile peft", "invalid_option") \
                from None


def fields(body: Submission) -> dict:
    """The job record's inputs as the body named them (a diff's id is resolved by the API), the export's
    parameters as its options (every one, with the model's defaults)."""
    params = engine_spec(body).model_dump(mode="json", include=set(PARAMETERS))
    return {**{role: getattr(body, role) for role in INPUTS}, "options": params, "recipe": None}


def spec(body: Submission) -> dict:
    return {"lora_export": engine_spec(body).model_dump(mode="json", include=set(PARAMETERS))}


def shown(spec: dict | None) -> None:
    return None  # the record's options show the parameters; the inputs are its own fields


def inputs(record: dict) -> dict[str, str]:
    return {role: record[role] for role in INPUTS if record.get(role)}


def request(record: dict, spec: dict, job_id: str, confinement: dict) -> Any:
    from worker.engine.pipeline.lora_request import LoraExportRequest

    named = {role: record.get(role) for role in INPUTS}
    return LoraExportRequest(LoraExport.model_validate({**spec["lora_export"], **named, "output": record["output"]}),
                             writer=job_id, **confinement)


def collect(pipe: Any, store: Any, tenant: str | None, record: dict) -> None:
    """A succeeded export is listed among the tenant's adapters, in the transaction that records it."""
    LORAS.collect(pipe, store, tenant, record)


LAYER = re.compile(r"\.\d+\.")  # a layer's index in a module's name: model.layers.3.mlp -> model.layers.*.mlp
MAX_SHOWN = 5


def _group(name: str) -> str:
    return LAYER.sub(".*.", name)


def _modules(modules: dict[str, dict]) -> dict:
    """The LoRA modules grouped by their name across layers: per group how many, the largest rank, the smallest
    retained energy, the largest relative error; and the modules with the largest error, by name."""
    groups: dict[str, dict] = {}
    for name, entry in modules.items():
        g = groups.setdefault(_group(name), {"count": 0, "rank": 0, "retained_energy_min": 1.0,
                                             "rel_frobenius_max": 0.0, "max_abs": 0.0})
        g["count"] += 1
        g["rank"] = max(g["rank"], entry["rank"])
        g["retained_energy_min"] = min(g["retained_energy_min"], entry["retained_energy"])
        g["rel_frobenius_max"] = max(g["rel_frobenius_max"], entry["rel_frobenius"])
        g["max_abs"] = max(g["max_abs"], entry["max_abs"])
    worst = sorted(modules, key=lambda n: -modules[n]["rel_frobenius"])[:MAX_SHOWN]
    return {"count": len(modules), "groups": groups,
            "worst": [{"module": n, **{k: modules[n][k] for k in ("rank", "retained_energy", "rel_frobenius")}}
                      for n in worst]}


def _left_out(left: dict[str, dict]) -> dict:
    """What the profile could not carry, grouped by tensor name across layers and reason: how many, their share of
    ||delta||^2, a few names."""
    groups: dict[tuple[str, str], dict] = {}
    for name, entry in left.items():
        g = groups.setdefault((_group(name), entry["reason"]), {"tensors": 0, "share": 0.0, "examples": []})
        g["tensors"] += 1
        g["share"] += entry.get("share", 0.0)
        if len(g["examples"]) < MAX_SHOWN:
            g["examples"].append(name)
    return {"tensors": len(left), "share": sum(e.get("share", 0.0) for e in left.values()),
            "groups": [{"tensor": t, "reason": r, **g} for (t, r), g in groups.items()]}


def _counted(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        out[_group(name)] = out.get(_group(name), 0) + 1
    return out


def summary(manifest: dict) -> dict:
    """What the job record (and GET /v1/loras/{id}) shows of lora-manifest.json: the inputs and their digests, the
    adapter's rank, size and totals, the modules grouped across layers, what was left out."""
    return {"format": manifest["format"], "engine": manifest.get("engine"), "rank": manifest["rank"],
            "lora_alpha": manifest.get("lora_alpha"), "scaling": manifest.get("scaling"),
            "inputs": {**manifest["inputs"], "files": manifest.get("input_files")},
            "bytes": sum(f["size"] for f in manifest["files"]), "totals": manifest["totals"],
            "modules": _modules(manifest["modules"]), "left_out": _left_out(manifest.get("left_out") or {}),
            "modules_to_save": _counted(manifest.get("modules_to_save") or []),
            "lora_bias": _counted(manifest.get("lora_bias") or []),
            # evaluate / a rank sweep: the curve, the pick and its rule (small: one row a rank)
            **({"fidelity": manifest["fidelity"]} if manifest.get("fidelity") else {}),
            **({"warnings": manifest["warnings"]} if manifest.get("warnings") else {})}


def run(request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
    from worker.engine.checks.checked_lora import run_checked_lora  # torch: in the job's process only

    def progress(p: dict) -> None:  # modules factored are the export's measure
        done, total = p.get("modules_done", 0), p.get("modules_total", 0)
        reporter.progress(Progress(p.get("phase", Phase.STREAMING), done, total, 0, None,
                                   done / total if total else 0.0))

    # The export with what it asks beyond the adapter (evaluate, a rank sweep): the engine's one driver, as the CLI's.
    result = run_checked_lora(request, settings, progress=progress, should_cancel=reporter.should_cancel)
    manifest = result.manifest
    lora = summary(manifest)
    stats = {**(manifest.get("stats") or {}), "bytes_written": lora["bytes"], "tensors": len(manifest["modules"])}
    return {"uri": result.output_uri, "manifest_uri": result.manifest_uri, "files": manifest["files"],
            "stats": stats, "lora": lora}
