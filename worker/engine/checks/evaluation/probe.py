"""The probe text and the loss a model gives it: mean negative log-likelihood in nats per predicted token,
computed in float32 over non-overlapping windows no longer than the models' context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import torch

from worker.engine.errors import GraftError
from worker.engine.storage.model import ResolvedModel
from worker.engine.verdict import PROBE_UNKNOWN_SHARE, unreadable_text

PROBE_RESOURCE = "data/probe.txt"
# The share of unknown tokens past which the probe's losses are not taken at their word: the function level's
# threshold (worker/engine/verdict.py, beside what it rests on), one figure for both.
UNKNOWN_SHARE_WARN = PROBE_UNKNOWN_SHARE


def builtin_probe_text() -> str:
    """Plain English prose shipped with the package (a few KB): generic text any base model has seen the
    like of, so its loss measures the model, not the text's oddity."""
    return resources.files("worker.engine").joinpath(PROBE_RESOURCE).read_text(encoding="utf-8")


def probe_text(text: str | None) -> tuple[str, str]:
    """(text, "user") when one is given, else (the built-in text, "builtin")."""
    return (text, "user") if text is not None else (builtin_probe_text(), "builtin")


def probe_ids(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The text's token ids as the tokenizer (a text.TextModel) encodes a document (its BOS included), the
    first `max_tokens`."""
    return probe_encoding(tokenizer, text, max_tokens)[0]


def probe_encoding(tokenizer, text: str, max_tokens: int) -> tuple[torch.Tensor, dict]:
    """probe_ids, and what those ids cover of the text: {"characters", "dropped"} (characters they do not
    spell: dropped by the tokenizer, or mapped to its unknown token)."""
    # Cut after encoding, not by the tokenizer: its truncation side is a setting of its own.
    ids, coverage = tokenizer.encode_with_coverage([text], special=True, max_tokens=max_tokens)
    if len(ids[0]) < 2:
        raise GraftError("invalid_option", f"the probe text gives {len(ids[0])} token(s); at least 2 are needed "
                         "to measure a loss")
    return torch.tensor(ids[0], dtype=torch.long), coverage[0]


def check_ids_in_vocab(ids: Sequence[torch.Tensor], models: Sequence[ResolvedModel], what: str) -> None:
    """A token id past a model's vocabulary would index outside its embedding."""
    top = max(int(t.max()) for t in ids)
    for model in models:
        vocab = model.vocab_size
        if vocab is not None and top >= vocab:
            raise GraftError("vocab_mismatch", f"the {what} holds token id {top}, past {model.role}'s vocabulary "
                             f"of {vocab}: the tokenizer is not this model's")


def context_window(models: Sequence[ResolvedModel], max_tokens: int) -> int:
    """Tokens per forward pass at most: the probe cap, within every model's context as transformers builds it
    (limits.model_context: n_positions, max_position_embeddings, text_config, sliding windows; a context
    under 2 is GraftError("invalid_input") naming its model)."""
    from worker.engine.checks.evaluation.limits import context_limit

    return context_limit(models, max_tokens)


def unknown_share(ids: torch.Tensor, unk_id: int | None) -> dict:
    """How many of the probe's tokens are the tokenizer's unknown token, and their share: text the
    vocabulary cannot spell is scored as one id whatever it was, so past UNKNOWN_SHARE_WARN the losses
    say little about the models. None when the tokenizer has no unknown token of its own (a byte-level
    one never needs it; GPT-2's is its end-of-text token, not countable as unknown)."""
    if unk_id is None:
        return {"tokens": len(ids), "unknown_tokens": None, "unknown_share": None}
    count = int((ids == unk_id).sum())
    return {"tokens": len(ids), "unknown_tokens": count, "unknown_share": count / len(ids)}


def probe_counts(ids: torch.Tensor, unk_id: int | None, coverage: dict) -> dict:
    """unknown_share's counts, and the characters of the probe text its ids do not spell: `characters`
    (those the ids cover), `characters_dropped` and `dropped_share` (0 for a text the tokenizer reads
    whole). A tokenizer without an unknown token drops what its vocabulary lacks without a trace in the
    ids: only this counts it; one with an unknown token counts it both ways."""
    characters, dropped = int(coverage["characters"]), int(coverage["dropped"])
    return {**unknown_share(ids, unk_id), "characters": characters, "characters_dropped": dropped,
            "dropped_share": dropped / characters if characters else 0.0}


def unknown_warning(counts: dict, what: str) -> dict | None:
    """The warning for a probe text the tokenizer cannot read: its unknown tokens past UNKNOWN_SHARE_WARN
    of its tokens, or the characters its ids do not spell past that share of its characters."""
    said = unreadable_text(counts, what)
    if not said:
        return None
    return {"code": "probe_unknown_tokens",
            "message": f"{'; '.join(said)} (more than {UNKNOWN_SHARE_WARN:.0%}): what the vocabulary cannot spell is "
                       "scored as one token or not at all, so the losses on it say little about the models",
            "values": dict(counts),
            "thresholds": {"unknown_share": UNKNOWN_SHARE_WARN, "dropped_share": UNKNOWN_SHARE_WARN}}


def model_device(module) -> torch.device:
    return next(module.parameters()).device


def mean_loss(module, ids: torch.Tensor, window: int, check: Callable[[], None] | None = None) -> float:
    """Mean cross-entropy (nats per token) of each token given the ones before it in its window. Windows do
    not overlap: each window's first token is context only (with one window, only the BOS goes unscored).
    Accumulated in float64 across windows; `check` runs after each forward pass."""
    device = model_device(module)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window].to(device)
            if len(chunk) < 2:
                break
            logits = module(chunk[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += len(chunk) - 1
            del logits
            if check is not None:
                check()
    return total / count


def scored_tokens(n: int, window: int) -> int:
    """How many of n tokens mean_loss scores: all but each window's first (and a trailing lone token)."""
    full, rest = divmod(n, window)
    return full * (window - 1) + max(rest - 1, 0)
