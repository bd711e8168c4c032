"""A small family the graft-with-checks tests share: a source base that scores text (a bigram fit), its
fine-tune (with a chat template), a near continuation of the base, the base itself as a target, an unrelated
base (another bigram fit, other random layers), and a fine-tune without tokenizer files."""

from __future__ import annotations

import os

from eval_helpers import CHAT_TEMPLATE, bigram_state, encode, save, tokenizer_files

from worker.devtools.sample_models import perturb

PROBE = ("the cat sat on the mat and the dog sat on the log. " * 6).strip()
PROMPTS = ["the cat", "a dog sat"]


def checks_family(root: str) -> dict[str, str]:
    ids = encode(PROBE)
    base = bigram_state(ids, seed=0)
    finetuned = perturb(base, seed=1, scale=0.1)
    near = perturb(base, seed=2, scale=0.01)
    unrelated = bigram_state(encode("zebra quartz jumps over fox " * 8), seed=7, rotation_seed=3)
    chat, plain = tokenizer_files(chat_template=CHAT_TEMPLATE), tokenizer_files()
    return {
        "base": save(os.path.join(root, "base"), base, tokenizer=plain),
        "finetuned": save(os.path.join(root, "finetuned"), finetuned, tokenizer=chat),
        "finetuned_no_tokenizer": save(os.path.join(root, "finetuned_no_tokenizer"), finetuned),
        "near": save(os.path.join(root, "near"), near, tokenizer=plain, shards=2),
        "unrelated": save(os.path.join(root, "unrelated"), unrelated, tokenizer=plain),
    }
