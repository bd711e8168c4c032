"""A recipe's `tokenizer`: the output takes one input's tokenizer, so every input's embedding rows must line
up with that tokenizer's ids.

graft keeps rows by id; mergekit (`tokenizer_source`) re-maps every model's rows to the output tokenizer by
token string. The two agree exactly when every input gives each of the output tokenizer's tokens the id that
tokenizer gives it (tokens an input has beyond them are dropped by both), and when the embeddings have as many
rows as the tokenizer has tokens (mergekit cuts or pads the rows to the tokenizer's size). `vocabularies:
equal` asks more, for a union: no input may have a token the output's tokenizer lacks (a union would add it,
at an id of its own choosing). Anything else is refused before a byte is read, naming the model and a token.
Vocabularies are read from tokenizer.json (the model's vocabulary and its added tokens); an input without any
tokenizer files is taken to have the output's, as mergekit assumes the base's for a model it cannot load.
"""

from __future__ import annotations

from worker.engine.errors import GraftError
from worker.engine.planning.recipe import TokenizerSource
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import load_json


def vocabulary(model: ResolvedModel, uri: str) -> dict[str, int] | None:
    """token -> id of a model's tokenizer (None: it has no tokenizer files at all)."""
    if not model.store.exists("tokenizer.json"):
        if model.tokenizer_files():
            raise GraftError("invalid_input", f"tokenizer: {uri} has no tokenizer.json, so its vocabulary cannot be "
                             "compared with the output tokenizer's", {"field": "tokenizer"})
        return None
    data = load_json(model.side_file("tokenizer.json"), f"{uri}/tokenizer.json", "invalid_input")
    vocab = data.get("model", {}).get("vocab") if isinstance(data, dict) else None
    if isinstance(vocab, list):  # Unigram: [piece, score] in id order
        vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    if not isinstance(vocab, dict):
        raise GraftError("invalid_input", f"tokenizer: {uri}/tokenizer.json holds no vocabulary graft can read",
                         {"field": "tokenizer"})
    out = {str(token): i for token, i in vocab.items() if isinstance(i, int)}
    for added in data.get("added_tokens") or ():
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            out[str(added.get("content"))] = added["id"]
    return out


def check_vocabularies(spec: TokenizerSource, models: dict[str, ResolvedModel], output_rows: int | None) -> None:
    """GraftError("invalid_recipe") unless every input's rows line up with `spec.source`'s tokenizer (above)."""
    source = vocabulary(models[spec.source], spec.source)
    if source is None:
        raise GraftError("invalid_recipe", f"tokenizer: {spec.source} has no tokenizer files to take",
                         {"field": "tokenizer.source"})
    if sorted(source.values()) != list(range(len(source))):
        raise GraftError("invalid_recipe", f"tokenizer: {spec.source}'s ids are not 0..{len(source) - 1} without "
                         "gaps: mergekit would renumber them", {"field": "tokenizer.source"})
    if output_rows is not None and output_rows != len(source):
        raise GraftError("invalid_recipe", f"tokenizer: {spec.source}'s tokenizer has {len(source)} tokens and the "
                         f"output's embeddings {output_rows} rows: mergekit would cut or pad the rows to the "
                         "tokenizer's size, which graft does not", {"field": "tokenizer.source"})
    for uri in dict.fromkeys(models):
        if uri != spec.source:
            _check_one(uri, vocabulary(models[uri], uri), source, spec)


def _check_one(uri: str, vocab: dict[str, int] | None, source: dict[str, int], spec: TokenizerSource) -> None:
    if vocab is None:
        return
    for token, i in source.items():
        if vocab.get(token) != i:
            has = f"gives it id {vocab[token]}" if token in vocab else "lacks it"
            raise GraftError("invalid_recipe", f"tokenizer: {spec.source}'s tokenizer gives {token[:40]!r} id {i} "
                             f"and {uri} {has}: mergekit would re-map its rows by token, graft keeps rows by id",
                             {"field": "tokenizer"})
    if spec.vocabularies == "equal":
        extra = next((t for t in vocab if t not in source), None)
        if extra is not None:
            raise GraftError("invalid_recipe", f"tokenizer: {uri} has {extra[:40]!r}, which {spec.source}'s "
                             "tokenizer lacks: a union would add it at an id of its own (graft takes one model's "
                             "tokenizer as it is)", {"field": "tokenizer"})
