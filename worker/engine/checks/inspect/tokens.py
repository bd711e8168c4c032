"""Tokenizer agreement: the token string behind each id in two models' tokenizer files. A graft adds the
fine-tune's embedding rows to the target's rows of the same id; an id that names another token in the
target's tokenizer gets a row trained for a different token.

Read from tokenizer.json (the model's vocabulary plus its added tokens) or, without one, vocab.json plus
added_tokens.json; a model with neither (a sentencepiece-only tokenizer.model, say) is "unknown", never an
error: tokenizer files are optional for a graft.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from worker.engine.storage.model import ResolvedModel

READ_CAP = 64 << 20  # bytes of one tokenizer file read at most (a 256k-token tokenizer.json is ~20 MB)
# Ids kept of one tokenizer at most: four times the largest vocabulary in use (Gemma's 262k). A file of
# millions of tiny entries fits in READ_CAP and would hold some hundreds of MB as Python objects, three
# tokenizers at once (in the API's preview process too); past this it is "unknown", never an error.
MAX_IDS = 1 << 20
EXAMPLES = 5  # re-assigned ids shown in a reason


@dataclass
class Vocab:
    ids: dict[int, str]
    special: set[int] = field(default_factory=set)
    file: str = ""


class _TooMany(ValueError):
    pass


def _read(model: ResolvedModel, name: str) -> object | None:
    if not model.store.exists(name) or model.store.size(name) > READ_CAP:
        return None
    return json.loads(model.side_file(name))


def _count(entries) -> None:
    if len(entries) > MAX_IDS:
        raise _TooMany(f"{len(entries):,} entries; at most {MAX_IDS:,} are compared")


def _from_tokenizer_json(doc: dict) -> Vocab:
    vocab = doc["model"]["vocab"]
    _count(vocab)
    _count(doc.get("added_tokens") or [])
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        ids = {int(i): str(tok) for tok, i in vocab.items()}
    else:  # Unigram: [[piece, score], ...], the id is the position
        ids = {i: str(entry[0]) for i, entry in enumerate(vocab)}
    special = set()
    for added in doc.get("added_tokens") or []:
        ids[int(added["id"])] = str(added["content"])
        if added.get("special"):
            special.add(int(added["id"]))
    return Vocab(ids, special, "tokenizer.json")


def read_vocab(model: ResolvedModel) -> tuple[Vocab | None, str]:
    """(the id -> token map, "") or (None, why it is unknown)."""
    try:
        doc = _read(model, "tokenizer.json")
        if isinstance(doc, dict) and isinstance(doc.get("model"), dict) and "vocab" in doc["model"]:
            return _from_tokenizer_json(doc), ""
        vocab = _read(model, "vocab.json")
        if isinstance(vocab, dict):
            _count(vocab)
            ids = {int(i): str(tok) for tok, i in vocab.items()}
            added = _read(model, "added_tokens.json")
            if isinstance(added, dict):
                _count(added)
            for tok, i in (added.items() if isinstance(added, dict) else ()):
                ids[int(i)] = str(tok)
            return Vocab(ids, set(), "vocab.json"), ""
    except _TooMany as exc:
        return None, f"tokenizer too large to compare ({exc})"
    except Exception as exc:  # unreadable or malformed: the check is advice, the graft may still run
        return None, f"tokenizer files unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    return None, f"no tokenizer.json or vocab.json (of at most {READ_CAP >> 20} MB)"


def compare(source: Vocab, target: Vocab, rows: int) -> dict:
    """Ids below `rows` (those the diff is applied to) whose token differs between the two tokenizers;
    `special`: ids that are special tokens on either side (renamed reserved tokens, typically). Only the ids
    either tokenizer names are visited: `rows` comes from a config (a vocab_size of 10^13 is a number, not a
    loop to run)."""
    regular, special, only_source, only_target = [], [], 0, 0
    for i in sorted(i for i in source.ids.keys() | target.ids.keys() if 0 <= i < rows):
        a, b = source.ids.get(i), target.ids.get(i)
        if a is None or b is None:
            only_source += a is not None
            only_target += b is not None
            continue
        if a != b:
            (special if i in source.special or i in target.special else regular).append(i)
    shown = [{"id": i, "source": source.ids[i], "target": target.ids[i]} for i in (regular or special)[:EXAMPLES]]
    return {"rows_compared": rows, "reassigned": len(regular), "reassigned_special": len(special),
            "only_in_source": only_source, "only_in_target": only_target, "examples": shown}


def added_tokens(base: Vocab, finetuned: Vocab) -> dict:
    """What a fine-tune changed in its base's tokenizer: ids it added and ids it renamed."""
    added = sorted(set(finetuned.ids) - set(base.ids))
    renamed = sorted(i for i in set(finetuned.ids) & set(base.ids) if finetuned.ids[i] != base.ids[i])
    return {"added": len(added), "added_examples": [{"id": i, "token": finetuned.ids[i]} for i in added[:EXAMPLES]],
            "renamed": len(renamed),
            "renamed_examples": [{"id": i, "base": base.ids[i], "finetuned": finetuned.ids[i]}
                                 for i in renamed[:EXAMPLES]]}
