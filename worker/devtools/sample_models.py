"""Small Llama-shaped checkpoints made on the spot, for the demo, the tests and the benches
(nothing can be downloaded here). They are real Hugging Face layouts that transformers loads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file


@dataclass
class LlamaShape:
    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    tied: bool = False
    attention_bias: bool = False
    extra_config: dict = field(default_factory=dict)

    def config(self, *, vocab: int | None = None, tied: bool | None = None, max_positions: int = 2048,
               rope_theta: float = 10000.0) -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab or self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": rope_theta,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tied if tied is None else tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }
        cfg.update(self.extra_config)
        return cfg


def llama_state(shape: LlamaShape, *, seed: int, vocab: int | None = None, tied: bool | None = None,
                dtype: torch.dtype = torch.bfloat16,
                norm_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Llama's names: bf16 matrices, float32 norms (mixed dtypes on purpose)."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or shape.vocab
    tied = shape.tied if tied is None else tied
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)

    def w(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=g) * 0.02).to(dtype)

    state = {"model.embed_tokens.weight": w(vocab, h)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = w(h, h)
        state[p + "self_attn.k_proj.weight"] = w(kv, h)
        state[p + "self_attn.v_proj.weight"] = w(kv, h)
        state[p + "self_attn.o_proj.weight"] = w(h, h)
        if shape.attention_bias:
            for n, d in (("q", h), ("k", kv), ("v", kv)):
                state[p + f"self_attn.{n}_proj.bias"] = w(d)
        state[p + "mlp.gate_proj.weight"] = w(shape.intermediate, h)
        state[p + "mlp.up_proj.weight"] = w(shape.intermediate, h)
        state[p + "mlp.down_proj.weight"] = w(h, shape.intermediate)
        state[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(norm_dtype)
        state[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(norm_dtype)
    state["model.norm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(norm_dtype)
    if not tied:
        state["lm_head.weight"] = w(vocab, h)
    return state


def perturb(state: dict[str, torch.Tensor], *, seed: int, scale: float = 0.05,
            extra_rows: int = 0, tied: bool | None = None) -> dict[str, torch.Tensor]:
    """A related checkpoint: every float tensor moved by `scale` of its own magnitude; optionally with
    `extra_rows` vocabulary rows appended (a fine-tune that added tokens) and tying changed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=g) * (t.float().std() if t.numel() > 1 else 1.0) * scale
            t = (t.float() + noise).to(t.dtype)
        out[name] = t
    if extra_rows:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in out:
                t = out[name]
                rows = (torch.randn(extra_rows, t.shape[1], generator=g) * 0.02).to(t.dtype)
                out[name] = torch.cat([t, rows])
    if tied is True:
        out.pop("lm_head.weight", None)
    elif tied is False and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def save_checkpoint(directory: str, state: dict[str, torch.Tensor], config: dict, *, shards: int = 1,
                    reverse: bool = False, tokenizer: dict | None = None,
                    generation_config: dict | None = None) -> str:
    """Write a Hugging Face layout; `shards` and `reverse` vary how tensors are split and ordered so that
    models line up by name only."""
    os.makedirs(directory, exist_ok=True)
    names = list(state)
    if reverse:
        names.reverse()
    if shards <= 1:
        save_file({n: state[n].contiguous() for n in names}, os.path.join(directory, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        groups = [names[i:i + per] for i in range(0, len(names), per)]
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: state[n].contiguous() for n in group}, os.path.join(directory, fname),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    for name, value in (tokenizer or {}).items():
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(value if isinstance(value, str) else json.dumps(value))
    if generation_config:
        with open(os.path.join(directory, "generation_config.json"), "w") as fh:
            json.dump(generation_config, fh)
    return directory


def chat_tokenizer_files(marker: str) -> dict:
    """Tokenizer files that name where they came from, so tests can see which model supplied them."""
    return {
        "tokenizer_config.json": {"model_max_length": 2048, "chat_template": "{{ '" + marker + "' }}",
                                  "tokenizer_class": "PreTrainedTokenizerFast"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
    }


def make_trio(root: str, *, shape: LlamaShape | None = None, added_rows: int = 8, tied=(False, False, False),
              shards=(1, 2, 3), seed: int = 0, target_only: bool = True,
              reverse_target: bool = True) -> dict[str, str]:
    """source_base, source_finetuned (with added vocabulary rows) and a drifted target_base, differently
    sharded; the target carries a tensor of its own. `tied` is (source_base, finetuned, target)."""
    shape = shape or LlamaShape()
    base = llama_state(shape, seed=seed, tied=tied[0])
    finetuned = perturb(base, seed=seed + 1, scale=0.05, extra_rows=added_rows, tied=tied[1])
    target = perturb(base, seed=seed + 2, scale=0.2, tied=tied[2])
    if target_only:
        target["model.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    paths = {}
    for role, state, vocab, n, tie, tok in (
        ("source_base", base, shape.vocab, shards[0], tied[0], "base"),
        ("source_finetuned", finetuned, shape.vocab + added_rows, shards[1], tied[1], "finetuned"),
        ("target_base", target, shape.vocab, shards[2], tied[2], "target"),
    ):
        cfg = shape.config(vocab=vocab, tied=tie, max_positions=4096 if role == "target_base" else 2048)
        gen = {"bos_token_id": 1, "eos_token_id": [2, 3] if role == "source_finetuned" else 2}
        paths[role] = save_checkpoint(os.path.join(root, role), state, cfg, shards=n,
                                      reverse=reverse_target and role == "target_base",
                                      tokenizer=chat_tokenizer_files(tok), generation_config=gen)
    return paths
