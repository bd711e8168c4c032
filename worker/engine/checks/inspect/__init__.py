"""`graft inspect`: is a graft worth building? Three levels, each optional past the first:

- headers: configs, tensor names/shapes/dtypes, tied layouts, tokenizers, estimates; no tensor data read.
- weights: one streaming pass over the three models (the engine's memory bound, each input read once):
  how far the target moved from the source base, relative to the fine-tune's delta, per tensor and layer.
- function: the loss along the straight line source_base -> target_base on a probe text (function.py).

Names are loaded on first use: the API process imports this package and must not pay for torch.
"""

from worker.engine.lazy import lazy_exports

_RULES = "worker.engine.verdict"  # the verdict's rules live below the checks: the pipeline warns by them
_EXPORTS = {
    "Level": _RULES,
    "Verdict": _RULES,
    "combine": _RULES,
    "function_reasons": _RULES,
    "reason": _RULES,
    "weights_reasons": _RULES,
    "worst": _RULES,
    "InspectResult": "inspection",
    "headers_verdict": "inspection",
    "inspect_graft": "inspection",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
