"""What a job or a command line asks of the evaluation of a graft: the single declaration the API body's
`evaluate: {...}` and `graft run --evaluate` both use (its field descriptions are the schema's and the help's).
No torch here: the API process imports it."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

PROBE_TEXT_MAX_BYTES = 64 << 10
PROMPTS_MAX = 16
PROMPT_MAX_BYTES = 2 << 10
MAX_NEW_TOKENS_MAX = 128

# Short and generic on purpose: they ask for the kinds of answer any chat or instruction fine-tune gives,
# so the KL and the samples say something whatever the fine-tune was for.
DEFAULT_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a short, polite email asking a colleague to move a meeting to Friday.",
    "List three things to check before going on a long hike.",
    "What is 17 multiplied by 3? Show your working.",
)


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _probe_size(value: str) -> str:
    if _utf8_bytes(value) > PROBE_TEXT_MAX_BYTES:
        # The schema counts characters; bytes are the limit: a refusal for a reason no schema states.
        raise PydanticCustomError("too_large", f"probe_text is {_utf8_bytes(value)} bytes of UTF-8; at most "
                                  f"{PROBE_TEXT_MAX_BYTES}")
    return value


# A probe text, wherever one is given (an evaluation's, a preflight's function level).
ProbeText = Annotated[str, StringConstraints(min_length=1, max_length=PROBE_TEXT_MAX_BYTES),
                      AfterValidator(_probe_size)]


class EvaluateSpec(BaseModel):
    """How to evaluate a graft's output against its target base and the fine-tune it took its diff from."""

    model_config = ConfigDict(extra="forbid")

    probe_text: ProbeText | None = Field(
        None, description="text the losses and perplexities are measured on (at most 64 KiB of UTF-8; only its first "
        "GRAFT_PROBE_MAX_TOKENS tokens are used); default: the probe text built into graft")
    prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=PROMPT_MAX_BYTES)]] | None = Field(
        None, min_length=1, max_length=PROMPTS_MAX,
        description=f"prompts (1 to {PROMPTS_MAX}, each at most 2 KiB of UTF-8) for the KL to the fine-tune and "
        "the greedy samples, rendered through the fine-tune's chat template when it has one; "
        "default: a few short built-in prompts")
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS_MAX,
                                description="tokens of each greedy sample at most (the worker may cap it lower: "
                                "GRAFT_EVAL_MAX_NEW_TOKENS)")

    @field_validator("prompts")
    @classmethod
    def _prompts_size(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not 1 <= len(value) <= PROMPTS_MAX:
            raise ValueError(f"prompts holds {len(value)}; give 1 to {PROMPTS_MAX} (or leave it out for the defaults)")
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise PydanticCustomError("invalid_option", f"prompts[{i}] is blank")
            if _utf8_bytes(prompt) > PROMPT_MAX_BYTES:
                raise PydanticCustomError("too_large", f"prompts[{i}] is {_utf8_bytes(prompt)} bytes of UTF-8; at "
                                          f"most {PROMPT_MAX_BYTES}")
        return value

    def prompt_list(self) -> list[str]:
        """The prompts asked for, else the built-in ones."""
        return list(self.prompts) if self.prompts is not None else list(DEFAULT_PROMPTS)
