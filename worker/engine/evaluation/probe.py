"""The probe text and the loss a model gives it: mean negative log-likelihood in nats per predicted token,
computed in float32 over non-overlapping windows no longer than the models' context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import torch

from ..errors import GraftError
from ..model import ResolvedModel

PROBE_RESOURCE = "data/probe.txt"


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
    # Cut after encoding, not by the tokenizer: its truncation side is a setting of its own.
    ids = tokenizer.encode([text], special=True, max_tokens=max_tokens)[0]
    if len(ids) < 2:
        raise GraftError("invalid_option", f"the probe text gives {len(ids)} token(s); at least 2 are needed "
                         "to measure a loss")
    return torch.tensor(ids, dtype=torch.long)


def check_ids_in_vocab(ids: Sequence[torch.Tensor], models: Sequence[ResolvedModel], what: str) -> None:
    """A token id past a model's vocabulary would index outside its embedding."""
    top = max(int(t.max()) for t in ids)
    for model in models:
        vocab = model.vocab_size
        if vocab is not None and top >= vocab:
            raise GraftError("vocab_mismatch", f"the {what} holds token id {top}, past {model.role}'s vocabulary "
                             f"of {vocab}: the tokenizer is not this model's")


def context_window(models: Sequence[ResolvedModel], max_tokens: int) -> int:
    """Tokens per forward pass: the probe cap, within every model's max_position_embeddings."""
    window = max_tokens
    for model in models:
        limit = model.config.get("max_position_embeddings")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2:
            window = min(window, limit)
    return max(window, 2)


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
            logits = module(chunk[None]).logits[0, :-1].float()
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
