"""LoRA adapters as the service keeps them: an adapter is what a succeeded `lora_export` job published
(adapter_config.json, adapter_model.safetensors, lora-manifest.json), known by that job's id; its record, listing
and deletion are a kind's collection's (worker/service/collections.py). What it shows of itself comes from the
job: the inputs and the export's parameters as the record holds them, and the manifest's summary the runner put in
the result (worker/service/kinds/lora_export.py `summary`); the full per-module table stays in the manifest."""

from __future__ import annotations

from worker.service.collections import Collection

KIND = "lora_export"
INPUTS = ("source_base", "source_finetuned", "diff", "target_base")


def _fields(job: dict) -> dict:
    summary = (job.get("result") or {}).get("lora") or {}
    return {**{role: job.get(role) for role in INPUTS}, "options": job.get("options") or {},
            "profile": (job.get("options") or {}).get("profile"), "rank": summary.get("rank"),
            "bytes": summary.get("bytes"), "totals": summary.get("totals"), "modules": summary.get("modules"),
            "left_out": summary.get("left_out"), "modules_to_save": summary.get("modules_to_save"),
            "lora_bias": summary.get("lora_bias"), "inputs": summary.get("inputs"),
            "engine": summary.get("engine"), "fidelity": summary.get("fidelity"),
            "warnings": summary.get("warnings") or []}


LORAS = Collection(KIND, "loras", "lora", "export", _fields)
