"""Running the models of a graft with transformers: loading them through their stores (loading.py), the
probe text and its loss (probe.py), and the evaluation of a graft's output (evaluate.py, asked for by an
EvaluateSpec, spec.py). The function-level probe of `graft inspect` (inspect/function.py) builds on these.

Names are loaded on first use: the API process imports EvaluateSpec and must not pay for torch.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_PROMPTS": "spec", "EvaluateSpec": "spec",
    "QUALITY_PPL_RATIO": "evaluate", "evaluate_graft": "evaluate",
    "Deadline": "loading", "check_fits": "loading", "load_causal_lm": "loading", "load_tokenizer": "loading",
    "builtin_probe_text": "probe", "mean_loss": "probe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
