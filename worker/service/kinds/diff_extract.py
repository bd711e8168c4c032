"""The diff extraction kind: a fine-tune's diff against its base extracted once into a diff artifact
(worker/engine/pipeline/diff_extract.py), submitted at POST /v1/diffs. A succeeded extraction is a diff of the
tenant's (worker/service/diffs.py: GET/DELETE /v1/diffs/{id}, and graft jobs take its id as `diff`); its job
record holds the manifest's summary (encoding, totals, content address, sources), the per-tensor table stays in
diff-manifest.json."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from worker.engine.diffs.request import DiffExtract
from worker.service.kinds.bodies import URI_FIELD, Submission
from worker.service.kinds.kind import Progress, Route
from worker.service.settings import Settings

NAME = "diff_extract"
COLLECTION = "diffs"
ROUTE = Route("/diffs", "diff", "Extract a diff artifact",
              "A job of its own kind, run by the workers and polled at /v1/jobs/{id} (the Location header): the "
              "fine-tune's difference to its base, stored exact or compressed under the output (its shards, the "
              "fine-tune's side files and diff-manifest.json, last). Once it succeeded, the job's id is the diff's: "
              "GET /v1/diffs/{id}, DELETE /v1/diffs/{id}, and graft jobs and preflights take it as `diff`.")
_PARAMETERS = ("encoding", "shard_size")


class DiffCreate(Submission, DiffExtract):
    """A diff extraction: the source pair, how the delta is stored, and what every submission holds."""

    model_config = ConfigDict(extra="forbid")
    source_base: str = Field(**{**URI_FIELD, "description": "the base the fine-tune started from: "
                                + URI_FIELD["description"]})
    source_finetuned: str = Field(**{**URI_FIELD, "description": "the fine-tune whose diff is extracted: "
                                     + URI_FIELD["description"]})


Body = DiffCreate


def fields(body: DiffCreate) -> dict:
    """The job record's inputs: the pair, and the extraction's parameters as its options."""
    return {"source_base": body.source_base, "source_finetuned": body.source_finetuned, "diff": None,
            "target_base": None, "options": body.model_dump(mode="json", include=set(_PARAMETERS)), "recipe": None}


def spec(body: DiffCreate) -> dict:
    return {"diff_extract": body.model_dump(mode="json", include={"source_base", "source_finetuned", *_PARAMETERS})}


def shown(spec: dict | None) -> None:
    return None  # the record's options show the parameters; the pair is its own fields


def inputs(record: dict) -> dict[str, str]:
    return {"source_base": record["source_base"], "source_finetuned": record["source_finetuned"]}


def request(record: dict, spec: dict, job_id: str, confinement: dict) -> Any:
    from worker.engine.diffs.request import DiffExtractRequest

    return DiffExtractRequest(DiffExtract.model_validate(spec["diff_extract"]), record["output"], writer=job_id,
                              **confinement)


def collect(pipe: Any, store: Any, tenant: str | None, record: dict) -> None:
    """A succeeded extraction is listed among the tenant's diffs, in the transaction that records it."""
    from worker.service import diffs  # the collection's layout (it imports this package's bodies)

    diffs.DIFFS.collect(pipe, store, tenant, record)


def summary(manifest: dict) -> dict:
    """What the job record (and GET /v1/diffs/{id}) shows of the diff manifest: its provenance (each source's URI,
    resolved revision and file digests), encoding, totals (sizes and reconstruction errors) and content address."""
    sources = {role: {"uri": s["uri"], "revision": s.get("revision"), "files": s.get("files") or {}}
               for role, s in manifest["sources"].items()}
    return {"format": manifest["format"], "encoding": manifest["encoding"], "totals": manifest["totals"],
            "content_address": manifest["content_address"], "sources": sources, "engine": manifest.get("engine"),
            "warnings": len(manifest.get("warnings") or ())}


def run(request: Any, spec: dict, settings: Settings, reporter: Any) -> dict:
    from worker.engine.pipeline.diff_extract import extract_diff  # torch: in the job's process only

    def progress(p) -> None:
        reporter.progress(Progress(p.phase, p.tensors_done, p.tensors_total, p.bytes_read, p.bytes_total,
                                   p.fraction))

    result = extract_diff(request, settings, progress=progress, should_cancel=reporter.should_cancel)
    manifest = result.manifest
    files = [*manifest["shards"], *manifest["side_files"]]
    stats = {**(manifest.get("stats") or {}), "bytes_written": sum(f["size"] for f in files),
             "tensors": manifest["totals"]["tensors"]}
    return {"uri": result.output_uri, "manifest_uri": result.manifest_uri, "files": files, "stats": stats,
            "diff": summary(manifest)}
