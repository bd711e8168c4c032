"""Running the models of a graft with transformers: loading them through their stores (loading.py), the
probe text and its loss (probe.py), and the evaluation of a graft's output (evaluate.py, asked for by an
EvaluateSpec, spec.py). The function-level probe of `graft inspect` (inspect/function.py) builds on these.

Names are loaded on first use: the API process imports EvaluateSpec and must not pay for torch.
"""

from worker.engine.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_PROMPTS": "spec", "EvaluateSpec": "spec",
    "QUALITY_PPL_RATIO": "evaluate", "evaluate_graft": "evaluate",
    "Deadline": "loading", "check_fits": "loading", "load_causal_lm": "loading", "load_tokenizer": "loading",
    "builtin_probe_text": "probe", "mean_loss": "probe",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
