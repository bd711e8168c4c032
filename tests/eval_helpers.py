"""Small checkpoints the model-running tests can score meaningfully (a random tiny model predicts every
token alike, so its losses along any path are flat), a real byte-level tokenizer for them, and the float64
references: transformers' own LlamaForCausalLM loaded from the same files, scored here line by line."""

from __future__ import annotations

import torch

from worker.devtools.sample_models import LlamaShape, llama_state, save_checkpoint

VOCAB = 260  # the tokenizer's 259 tokens (3 specials, 256 bytes) and one spare row
SHAPE = LlamaShape(vocab=VOCAB, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer_json() -> str:
    """A byte-level tokenizer of the tokenizers library: <unk>, <s>, </s>, then one token per byte; BOS
    prepended to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: 3 + i for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return tok.to_str()


def tokenizer_files(*, chat_template: str | None = None) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 2048}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": config}


def encode(text: str, *, special: bool = True) -> list[int]:
    """The reference tokenization, by the tokenizers library itself (not through transformers)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json()).encode(text, add_special_tokens=special).ids


def bigram_state(ids: list[int], *, seed: int, rotation_seed: int | None = None, sharpness: float = 1.0,
                 tied: bool = False) -> dict[str, torch.Tensor]:
    """A tiny Llama whose embedding and head carry a rank-64 fit of the text's bigram log-probabilities (the
    layers add small random updates): its loss is well below log(vocab). `rotation_seed` turns embedding
    and head by one random orthogonal matrix: the same function (RMSNorm and the head see only inner
    products), other weights, and a barrier between the two."""
    counts = torch.full((VOCAB, VOCAB), 0.05, dtype=torch.float64)
    for a, b in zip(ids, ids[1:], strict=False):
        counts[a, b] += 1
    logp = torch.log(counts / counts.sum(1, keepdim=True))
    u, s, vh = torch.linalg.svd(logp)
    k = SHAPE.hidden
    embed = u[:, :k] * s[:k].sqrt()
    head = vh[:k].T * s[:k].sqrt() * sharpness
    if rotation_seed is not None:
        g = torch.Generator().manual_seed(rotation_seed)
        rot, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        embed, head = embed @ rot, head @ rot
    state = llama_state(SHAPE, seed=seed, tied=tied)
    state["model.embed_tokens.weight"] = embed.to(torch.bfloat16)
    if not tied:
        state["lm_head.weight"] = head.float()
    return state


def save(directory: str, state: dict, *, tied: bool = False, shards: int = 1, tokenizer: dict | None = None,
         generation_config: dict | None = None, max_positions: int = 2048) -> str:
    return save_checkpoint(directory, state, SHAPE.config(tied=tied, max_positions=max_positions), shards=shards,
                           tokenizer=tokenizer, generation_config=generation_config)


def resolve(path: str, role: str):
    from worker.engine.storage.model import resolve_model
    from worker.engine.storage.uris import parse_uri

    return resolve_model(role, parse_uri(path, field=role))


def reference_model(path: str):
    """transformers' own loader, float64."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def reference_loss(model, ids: list[int], window: int) -> float:
    """Mean nats per token over non-overlapping windows (each window's first token is context only)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor(ids[start:start + window])
            if len(chunk) < 2:
                break
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            total -= sum(float(logp[i, int(chunk[i + 1])]) for i in range(len(chunk) - 1))
            count += len(chunk) - 1
    return total / count

