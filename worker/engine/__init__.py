"""The grafting engine: a pure library (no HTTP, no queue) that the CLI and the worker both call.

    output = target_base + alpha * (source_finetuned - source_base)

Names are loaded on first use: the API process checks URIs and options with this package and must not
pay for importing torch.
"""

from worker.engine.lazy import lazy_exports

_EXPORTS = {
    "GraftCancelled": "errors", "GraftError": "errors", "GraftSuperseded": "errors",
    "GraftOptions": "planning.options", "GraftRequest": "planning.request", "parse_size": "planning.options",
    "GraftResult": "pipeline.graft", "Phase": "pipeline.graft", "Progress": "pipeline.graft",
    "plan_graft": "pipeline.graft", "resolve_inputs": "pipeline.graft",
    "run_graft": "pipeline.graft",
    "MANIFEST": "storage.sinks",
    "Location": "storage.uris", "parse_uri": "storage.uris",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
