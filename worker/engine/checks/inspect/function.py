"""The function level of `graft inspect`: are the two bases linearly connected? The loss on a probe text at
(1 - l) * source_base + l * target_base for l in 0, 1/4, 1/2, 3/4, 1, and the barrier: the largest excess of
that loss over the straight line joining its two ends (Frankle et al.'s measure of linear mode connectivity).

Memory: two modules in float32, not three. The source base is loaded into one and scored; the target base
into the other and scored; the second then becomes target - source, and the first walks the line in place
by quarter steps (source + l * (target - source): a quarter is a power of two, so each step rounds once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.checks.evaluation.limits import window_limit
from worker.engine.checks.evaluation.loading import (
    Deadline,
    Phase,
    build_config,
    fit_window,
    loaded,
    running,
    transient_buffers,
)
from worker.engine.checks.evaluation.probe import (
    check_ids_in_vocab,
    context_window,
    mean_loss,
    probe_counts,
    probe_encoding,
    probe_text,
    scored_tokens,
)
from worker.engine.checks.evaluation.text import open_tokenizer
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.storage.model import ResolvedModel

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Config entries that do not change what the model computes on a probe window: names, dtypes, token ids,
# bookkeeping; the context length only bounds the window (the smaller of the two is used); tying is
# handled by loading both untied; the vocabulary is checked through the tensors' shapes.
INERT_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "max_position_embeddings",
    "tie_word_embeddings", "vocab_size", "id2label", "label2id", "output_attentions", "output_hidden_states",
    "return_dict", "initializer_range", "problem_type", "chunk_size_feed_forward", "tokenizer_class",
    "_attn_implementation_autoset", "output_router_logits", "max_length", "n_positions", "n_ctx", "max_seq_len",
    "max_sequence_length", "seq_length",
})


def function_probe(source_base: ResolvedModel, target_base: ResolvedModel, tokenizer_from: ResolvedModel, *,
                   text: str | None, settings: EngineSettings, device: str = "cpu",
                   should_cancel: Callable[[], bool] | None = None) -> dict:
    """{"lambdas", "losses" (mean nats/token), "barrier", "barrier_ratio", "tokens", "probe", "seconds",
    "window", "unknown_share" (of the probe's tokens, None without an unknown token), "dropped_share" (of
    its characters, those its tokens do not spell), ...}.
    Refuses with model_too_large (before loading), eval_timeout, no_tokenizer, and, for bases that do not
    compute the same function shape (architecture_mismatch, shape_conflict, config_mismatch)."""
    deadline = Deadline(settings.eval_seconds, should_cancel, what="function-level probe")
    untie = refuse_mismatch(source_base, target_base)
    upper = context_window([source_base, target_base], settings.probe_max_tokens)
    body, source = probe_text(text)
    with open_tokenizer(tokenizer_from, check=deadline.check) as tokenizer:  # the tenant's: in a bounded child
        ids, coverage = probe_encoding(tokenizer, body, settings.probe_max_tokens)
        unknown = probe_counts(ids, tokenizer.unk_token_id, coverage)
    check_ids_in_vocab([ids], [source_base, target_base], "probe text")
    heads = sum(_tied_head_bytes(m) for m in (source_base, target_base)) if untie else 0
    bases = [source_base, target_base]
    window = fit_window([Phase(bases, extra_bytes=heads)], settings, device=device, upper=upper,
                        what="function-level probe")
    deadline.check()
    losses = walk_line(source_base, target_base, ids, window, device=device, untie=untie, check=deadline.check)
    barrier, ratio = barrier_of(losses)
    return {"lambdas": list(LAMBDAS), "losses": losses, "barrier": barrier, "barrier_ratio": ratio,
            "tokens": len(ids), "scored_tokens": scored_tokens(len(ids), window), "window": window,
            "window_limited_by": window_limit(window, upper, settings.probe_max_tokens), **unknown,
            "probe": source, "untied": untie, "seconds": round(deadline.elapsed, 3)}


def _tied_head_bytes(model: ResolvedModel) -> int:
    """float32 bytes of the head a tied model gets when built untied (0 when it stores its own head)."""
    from worker.engine.planning.plan import EMBED_NAME, LM_HEAD_NAME, find_name

    embed = find_name(model.tensors, EMBED_NAME)
    if embed is None or find_name(model.tensors, LM_HEAD_NAME) is not None:
        return 0
    return model.tensors[embed].numel * 4


def barrier_of(losses: list[float]) -> tuple[float, float]:
    """(max over lambda of loss(l) - ((1 - l) loss(0) + l loss(1)), that over the ends' mean loss). Never
    below 0: the ends lie on the line."""
    first, last = losses[0], losses[-1]
    barrier = max(loss - ((1 - lam) * first + lam * last) for lam, loss in zip(LAMBDAS, losses, strict=True))
    barrier = max(barrier, 0.0)
    mean = (first + last) / 2
    return barrier, (barrier / mean if mean > 0 else 0.0)


def walk_line(source_base: ResolvedModel, target_base: ResolvedModel, ids: torch.Tensor, window: int, *,
              device: str, untie: bool, check: Callable[[], None]) -> list[float]:
    """The probe loss at each of LAMBDAS, the ends scored on the models as stored."""
    losses: dict[float, float] = {}
    with loaded(source_base, device=device, untie=untie, check=check) as walker:
        with running(source_base):
            losses[0.0] = mean_loss(walker, ids, window, check)
        with loaded(target_base, device=device, untie=untie, check=check) as target:
            with running(target_base):
                losses[1.0] = mean_loss(target, ids, window, check)
            pairs = _pairs(walker, target)
            with torch.no_grad():
                for here, there in pairs:
                    there.sub_(here)  # the target's module now holds target - source (its loss is taken)
            for previous, lam in zip(LAMBDAS[:-2], LAMBDAS[1:-1], strict=True):
                with torch.no_grad():
                    for here, diff in pairs:
                        here.add_(diff, alpha=lam - previous)
                with running(source_base, f"forward pass at lambda {lam:g}"):
                    losses[lam] = mean_loss(walker, ids, window, check)
    return [losses[lam] for lam in LAMBDAS]


def _pairs(a, b) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The floating tensors two modules of one config hold, matched by name, each once (a tied head is the
    embedding); buffers the config computes (rotary frequencies) are the same in both and stay put."""
    left, right = _float_state(a), _float_state(b)
    if list(left) != list(right):
        raise GraftError("shape_conflict", "the two bases build modules with different tensors")
    return [(left[n], right[n]) for n in left]


def _float_state(module) -> dict[str, torch.Tensor]:
    transient = transient_buffers(module)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in transient or not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def refuse_mismatch(source_base: ResolvedModel, target_base: ResolvedModel) -> bool:
    """Refuse bases whose interpolation is not defined (another architecture, other tensor shapes, a config
    that computes differently: the barrier would measure the config change, not the weights). Returns
    whether to load both untied (their tying differs)."""
    kinds = (source_base.config.get("model_type"), target_base.config.get("model_type"))
    if kinds[0] != kinds[1]:
        raise GraftError("architecture_mismatch", f"the function level needs bases of one architecture: "
                         f"source_base is {kinds[0]!r}, target_base {kinds[1]!r}")
    differ = [(n, s.shape, target_base.tensors[n].shape) for n, s in source_base.tensors.items()
              if n in target_base.tensors and s.shape != target_base.tensors[n].shape]
    if differ:
        said = ", ".join(f"{n} {list(a)} vs {list(b)}" for n, a, b in differ[:3])
        raise GraftError("shape_conflict", f"the function level interpolates the bases tensor by tensor; "
                         f"{len(differ)} tensor(s) differ in shape: {said}")
    configs = [build_config(m).to_dict() for m in (source_base, target_base)]
    keys = sorted(k for k in set(configs[0]) | set(configs[1])
                  if k not in INERT_CONFIG_KEYS and configs[0].get(k) != configs[1].get(k))
    if keys:
        said = "; ".join(f"{k}: {configs[0].get(k)!r} vs {configs[1].get(k)!r}" for k in keys[:5])
        raise GraftError("config_mismatch", f"the bases' configs differ in what the model computes ({said}); "
                         "the loss between them would mix the config change with the weights'")
    ties = [bool(getattr(build_config(m), "tie_word_embeddings", False)) for m in (source_base, target_base)]
    return ties[0] != ties[1]
