"""The grafting engine: a pure library (no HTTP, no queue) that the CLI and the worker both call.

    output = target_base + alpha * (source_finetuned - source_base)
"""

from .errors import GraftCancelled, GraftError
from .options import GraftOptions, GraftRequest, parse_size
from .run import GraftResult, Progress, plan_graft, resolve_inputs, run_graft
from .sinks import MANIFEST
from .uris import Location, parse_uri

__all__ = [
    "GraftCancelled", "GraftError", "GraftOptions", "GraftRequest", "GraftResult", "Location", "MANIFEST",
    "Progress", "parse_size", "parse_uri", "plan_graft", "resolve_inputs", "run_graft",
]
