"""Which 2-D weights of an architecture a LoRA adapter can factor, and how they are stored.

transformers stores nn.Linear weights [out, in]; GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) stores them
[in, out] and computes x W + b. PEFT wraps a Conv1D in its lora.Linear with `fan_in_fan_out=True` (it sets the flag
itself, with a warning, when the config says otherwise: peft/tuners/lora/layer.py dispatch_default) and applies
transpose(lora_B @ lora_A): lora_A is still [r, in], lora_B [out, r]. So a Conv1D delta D [in, out] = U V (as
the encoder factors the stored matrix) is written lora_A = U^T, lora_B = alpha V^T, and the config says
fan_in_fan_out: true.

Embeddings are never factored (PEFT's lora.Embedding is not what vLLM loads, and a vocabulary-sized factor saves
little): the input embedding is carried by `trainable_token_indices` (its changed rows) in the peft profile.
Tied embeddings (`tie_word_embeddings`; the default of Gemma2 and GPT-2) have no lm_head tensor: PEFT's
trainable tokens layer ties itself to the output embedding too, so one set of rows moves both as the graft's
tied output does; modules_to_save on a tied embedding would untie them."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.errors import GraftError


@dataclass(frozen=True)
class Layout:
    model_type: str
    conv1d: tuple[str, ...] = ()  # module-name suffixes stored [in, out]; when set, the only factored ones
    embedding: str = "embed_tokens"  # the input embedding's last name component
    positional: tuple[str, ...] = ()  # other embeddings (never factored; modules_to_save in peft)
    tied_default: bool = False  # tie_word_embeddings when the config does not say

    def transposed(self, module: str) -> bool:
        return any(module == s or module.endswith("." + s) for s in self.conv1d)

    def embedding_like(self, module: str) -> bool:
        last = module.rsplit(".", 1)[-1]
        return last == self.embedding or last in self.positional

    def factorable(self, module: str) -> bool:
        """A 2-D weight this layout computes as a matrix product (Linear, or Conv1D where the layout has it)."""
        if self.embedding_like(module):
            return False
        return self.transposed(module) if self.conv1d else True

    def tied(self, config: dict) -> bool:
        value = config.get("tie_word_embeddings")
        return self.tied_default if value is None else bool(value)


_GPT2 = Layout("gpt2", conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), embedding="wte",
               positional=("wpe",), tied_default=True)
LAYOUTS = {t: Layout(t) for t in ("llama", "mistral", "qwen2", "qwen3")} | {
    "gemma2": Layout("gemma2", tied_default=True), "gpt2": _GPT2}


def layout_of(config: dict) -> Layout:
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        raise GraftError("unsupported_architecture", f"LoRA export knows the layouts of {', '.join(sorted(LAYOUTS))}"
                         f" targets; this one is {model_type!r}")
    return layout
