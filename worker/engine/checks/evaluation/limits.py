"""How long a window a model can take and what its forward pass holds, read from the config transformers
builds (so GPT-2's n_positions counts as Llama's max_position_embeddings does, and a multimodal config's
text_config is the one that runs), and the largest window that fits the memory bound.

The memory model, per forward pass of T tokens, float32 (4 bytes a value), batch of one:
    attention  ATTENTION_COPIES x heads x T^2 + MASK_COPIES x T^2
    hidden     HIDDEN_COPIES x T x width          (width: the widest of hidden, heads x head_dim, the MLP)
    KV cache   2 x layers x T x kv_heads x head_dim
    logits     LOGITS_COPIES x T x vocab, for each model whose logits are held at once
Attention is counted as materialized for every implementation: eager holds the scores and the
probabilities (measured: 2.05 x heads x T^2), and SDPA falls back to its math kernel, which does the same
(measured 2.3 x on CPU with head_dim 1), whenever its fused kernels do not take the shapes or the dtype;
its chunked kernels take far less, but which one runs depends on the device, the dtype and the head size,
so the bound assumes the fallback. Only one forward pass runs at a time, so attention, hidden states and
the cache count once per phase, for the costliest model held; logits count for every model whose logits are
held together (the KL holds two).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.errors import GraftError
from worker.engine.storage.model import ResolvedModel

# Config entries that bound the positions a model can take: the table of learned positions (GPT-2,
# GPT-J, OPT, ...) or what rotary models were trained for. Their smallest is the model's context. Only
# those its config class declares count: transformers keeps any other key of config.json as an attribute
# the model never reads (a Llama's `seq_length: 1` bounds nothing).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                "seq_length")
# Attention spans (declared, as above): a window no longer than these lets every token see all of its
# window, so they bound the probe's windows; they do not bound the positions a model takes (a Mistral runs
# a prompt past its sliding window), so a prompt is held to the context alone.
SPAN_KEYS = ("sliding_window", "attention_chunk_size")
ATTENTION_COPIES = 3  # eager measured 2.05, SDPA's math fallback 2.3: rounded up
MASK_COPIES = 2  # the causal mask transformers builds (float32, T x T) and its broadcast sum
HIDDEN_COPIES = 16  # residual stream, norms, q/k/v (repeated for GQA, rotated), MLP's gate/up/product
LOGITS_COPIES = 3  # the logits, the log-softmax of the loss or the KL, and a float32 cast
VALUE_BYTES = 4
# Below this many tokens a window measures little (a bigram model scores as well): a model whose memory
# allows no more is refused rather than probed on a few tokens; a model whose context is shorter uses it.
MIN_WINDOW = 32


@dataclass(frozen=True)
class ForwardShape:
    """What a forward pass's activations depend on."""

    role: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    vocab: int


def _int(config, key: str) -> int | None:
    try:
        value = getattr(config, key, None)
    except Exception:  # a property of the config class that cannot answer
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _configs(model: ResolvedModel) -> list:
    """The transformers config of the model and, when another, the text config that runs."""
    from worker.engine.checks.evaluation.loading import build_config

    config = build_config(model)
    out = [config]
    try:
        text = config.get_text_config(decoder=True)
    except Exception:
        text = None
    if text is not None and text is not config:
        out.append(text)
    return out


@functools.lru_cache(maxsize=1024)
def declares(cls: type, key: str) -> bool:
    """Whether config class `cls` declares `key` (a parameter of its __init__, an attribute_map alias or a
    class attribute): the keys its model may read. A class whose __init__ names nothing (all **kwargs) says
    nothing either way, and every key is taken as declared."""
    if key in (getattr(cls, "attribute_map", None) or {}) or any(key in vars(c) for c in cls.__mro__):
        return True
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return True
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    return key in named or not named


def _declared_int(config, key: str) -> int | None:
    return _int(config, key) if declares(type(config), key) else None


def model_limits(model: ResolvedModel) -> tuple[int | None, int | None]:
    """(context, span): the most positions the model takes (the smallest of its configs' declared context
    entries) and the shortest attention span it uses (a sliding window, an attention chunk); None for what
    it states none of. A context under 2 leaves no token to score given another: GraftError("invalid_input")."""
    contexts: list[int] = []
    spans: list[int] = []
    for config in _configs(model):
        for key in CONTEXT_KEYS:
            value = _declared_int(config, key)
            if value is not None:
                if value < 2:
                    name = (getattr(type(config), "attribute_map", None) or {}).get(key, key)  # as config.json has it
                    raise GraftError("invalid_input", f"{model.role}: its config.json says {name} = {value}: a "
                                     "context under 2 tokens leaves nothing to score")
                contexts.append(value)
        if getattr(config, "use_sliding_window", True) is False:
            continue
        for key in SPAN_KEYS:
            value = _declared_int(config, key)
            if value is not None and value >= 2:  # a span of 1 is the config's business, not a window's
                spans.append(value)
    return min(contexts, default=None), min(spans, default=None)


def model_context(model: ResolvedModel) -> int | None:
    """The most tokens one probe window may hold for this model: its context, within its attention span."""
    found = [v for v in model_limits(model) if v is not None]
    return min(found) if found else None


def context_limit(models: Sequence[ResolvedModel], max_tokens: int, *, spans: bool = True) -> int:
    """Tokens per window at most: GRAFT_PROBE_MAX_TOKENS within every model's context and, with `spans`
    (a probe's windows, not a prompt), its attention span."""
    window = max(max_tokens, 2)
    for model in models:
        context, span = model_limits(model)
        for value in (context, span if spans else None):
            if value is not None:
                window = min(window, value)
    return window


def forward_shape(model: ResolvedModel) -> ForwardShape:
    """The model's dimensions as transformers will run them; what the config leaves out is taken at its
    costliest (heads: one per hidden unit)."""
    config = _configs(model)[-1]
    dims = [d for info in model.tensors.values() for d in info.shape if d != model.vocab_size]
    widest = max(dims, default=1)
    hidden = _int(config, "hidden_size") or widest
    heads = _int(config, "num_attention_heads") or hidden
    head_dim = _int(config, "head_dim") or max(1, hidden // max(heads, 1))
    kv_heads = _int(config, "num_key_value_heads") or heads
    layers = _int(config, "num_hidden_layers") or len(model.tensors)
    width = max(widest, hidden, heads * head_dim, kv_heads * head_dim)
    vocab = model.vocab_size or widest
    return ForwardShape(model.role, max(layers, 1), max(heads, 1), max(kv_heads, 1), max(head_dim, 1), width,
                        max(vocab, 1))


def pass_bytes(shape: ForwardShape, tokens: int) -> int:
    """One forward pass's activations apart from its logits: attention, hidden states, KV cache."""
    t = tokens
    attention = ATTENTION_COPIES * shape.heads * t * t + MASK_COPIES * t * t
    hidden = HIDDEN_COPIES * t * shape.width
    cache = 2 * shape.layers * t * shape.kv_heads * shape.head_dim
    return VALUE_BYTES * (attention + hidden + cache)


def logits_bytes(shape: ForwardShape, tokens: int) -> int:
    return VALUE_BYTES * LOGITS_COPIES * tokens * shape.vocab


def activation_bytes(tokens: int, models: Sequence[ResolvedModel], *, at_once: int = 1) -> int:
    """The activations of forward passes of `tokens` tokens through `models`, one pass at a time, the
    logits of `at_once` of them held together (see the module's docstring)."""
    shapes = [forward_shape(m) for m in models]
    return (max(pass_bytes(s, tokens) for s in shapes)
            + at_once * max(logits_bytes(s, tokens) for s in shapes))


def window_limit(window: int, upper: int, max_tokens: int) -> str:
    """What set a window: the memory bound (fit_window shortened it), the models' context, or the cap."""
    if window < upper:
        return "memory"
    return "GRAFT_PROBE_MAX_TOKENS" if window >= max_tokens else "context"
