"""The grafting engine: a pure library (no HTTP, no queue) that the CLI and the worker both call.

    output = target_base + alpha * (source_finetuned - source_base)

Names are loaded on first use: the API process checks URIs and options with this package and must not
pay for importing torch.
"""

from .lazy import lazy_exports

_EXPORTS = {
    "GraftCancelled": "errors", "GraftError": "errors", "GraftSuperseded": "errors",
    "GraftOptions": "options", "GraftRequest": "options", "parse_size": "options",
    "GraftResult": "run", "Phase": "run", "Progress": "run", "plan_graft": "run", "resolve_inputs": "run",
    "run_graft": "run",
    "MANIFEST": "sinks",
    "Location": "uris", "parse_uri": "uris",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
