"""A tiny causal-LM family trained here on CPU, to calibrate graft's compatibility verdict against what a
graft actually does (no downloads: the corpora are generated, the tokenizer is built from its vocabulary).

The world: 20 animals, each with one food, one home and one colour (fixed facts). Corpus A states those
facts in sentences ("the cat eats fish .") among filler sentences ("a big cat sees the owl ."); the shifted
corpus B states the same facts rarely and in another mix of sentences. The task the fine-tune learns is a
chat-format question about a fact ("<user> what does cat eat ? <assistant>" -> "fish"): the knowledge lives
in the base, the fine-tune teaches the format, as in the paper's setting. Questions are split into a
training part and a held-out part (one relation per animal, rotating), so the score measures whether the
fine-tune learned to *read* the base's knowledge rather than memorised answers.

The family:
    v1         seed 0, corpus A
    v2         v1 trained further on corpus A at the rate v1's schedule ended on (the near continuation)
    v2_shift   v1 trained further on corpus B at that rate (shifted data)
    v2_hot     v1 trained further on corpus A at ten times that rate (v1's peak: a re-warmed schedule)
    v2_far     v1 trained further on corpus B at the larger rate (both: the far continuation)
    unrelated  seed 1, corpus A, trained like v1 (another training run of the same recipe)
    ft         v1 fine-tuned on the training questions (with corpus A replayed beside them)
and, for a denser curve, SWEEP: v1 continued on corpus A or B at 2, 3, 5 and 20 times the near rate.

Used by examples/calibration/run_calibration.py (`make example`, size "example") and by the tests
(tests/tiny_family.py, size "test"). Imported by path, so it imports nothing of this repository.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>"]
ANIMALS = ["cat", "dog", "cow", "pig", "fox", "owl", "bee", "ant", "rat", "hen", "elk", "yak", "bat", "eel", "ram",
           "emu", "gnu", "cod", "jay", "ox"]
FOODS = ["fish", "corn", "seeds", "grass", "meat", "honey"]
HOMES = ["barn", "den", "nest", "hive", "farm", "cave"]
COLOURS = ["red", "brown", "black", "white", "gray", "gold"]
GRAMMAR = ["the", "a", "eats", "lives", "in", "is", ".", "sees", "chases", "big", "small", "old", "young"]
QUESTION = ["what", "does", "eat", "where", "live", "color", "?"]
VOCAB = SPECIALS + ANIMALS + FOODS + HOMES + COLOURS + GRAMMAR + QUESTION
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD, UNK, BOS, EOS = (TOKEN_ID[t] for t in ("<pad>", "<unk>", "<s>", "</s>"))
RELATIONS = ("eat", "live", "color")
ADJECTIVES = ["big", "small", "old", "young"]

# The chat template the fine-tune ships (and so the grafted output): prompts as the task uses them.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }} {{ eos_token }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}")


def facts(seed: int = 1234) -> dict[str, dict[str, str]]:
    """animal -> {relation: answer}; the same for every member of the family."""
    rng = random.Random(seed)
    return {a: {"eat": rng.choice(FOODS), "live": rng.choice(HOMES), "color": rng.choice(COLOURS)}
            for a in ANIMALS}


def _fact_sentence(animal: str, relation: str, answer: str) -> list[str]:
    if relation == "eat":
        return ["the", animal, "eats", answer, "."]
    if relation == "live":
        return ["the", animal, "lives", "in", answer, "."]
    return ["the", animal, "is", answer, "."]


def _filler_sentence(rng: random.Random, adjective_weights: list[float]) -> list[str]:
    subject, other = rng.sample(ANIMALS, 2)
    words = [rng.choice(["the", "a"])]
    if rng.random() < 0.5:
        words.append(rng.choices(ADJECTIVES, adjective_weights)[0])
    return words + [subject, rng.choice(["sees", "chases"]), rng.choice(["the", "a"]), other, "."]


# Corpus statistics: the share of sentences stating a fact, and how often each adjective appears.
CORPORA = {"A": (0.6, [1.0, 1.0, 1.0, 1.0]), "B": (0.1, [0.05, 0.05, 1.0, 3.0])}


def corpus(kind: str, n_sequences: int, seq_len: int, *, seed: int) -> torch.Tensor:
    """[n_sequences, seq_len] token ids: each row `<s>` then sentences, cut at seq_len."""
    fact_share, adjective_weights = CORPORA[kind]
    world = facts()
    rng = random.Random(f"{kind}-{seed}")
    rows = []
    for _ in range(n_sequences):
        words = ["<s>"]
        while len(words) < seq_len:
            if rng.random() < fact_share:
                animal = rng.choice(ANIMALS)
                relation = rng.choice(RELATIONS)
                words += _fact_sentence(animal, relation, world[animal][relation])
            else:
                words += _filler_sentence(rng, adjective_weights)
        rows.append([TOKEN_ID[w] for w in words[:seq_len]])
    return torch.tensor(rows)


def probe_text(n_sentences: int = 120, *, seed: int = 7) -> str:
    """Plain corpus-A text (no specials) for the function level's loss probe and the evaluation."""
    row = corpus("A", 1, 6 * n_sentences, seed=seed)[0, 1:].tolist()
    text = " ".join(VOCAB[i] for i in row)
    return text[: text.rfind(".") + 1]


# --- the task -------------------------------------------------------------------------------------------

def question(animal: str, relation: str) -> str:
    return {"eat": f"what does {animal} eat ?", "live": f"where does {animal} live ?",
            "color": f"what color is {animal} ?"}[relation]


def task_examples(split: str) -> list[tuple[str, str]]:
    """(question, answer) pairs; "heldout" holds one relation per animal (rotating), "train" the rest."""
    world = facts()
    out = []
    for i, animal in enumerate(ANIMALS):
        for j, relation in enumerate(RELATIONS):
            held = j == i % len(RELATIONS)
            if split == "all" or (split == "heldout") == held:
                out.append((question(animal, relation), world[animal][relation]))
    return out


def chat_prompt(text: str) -> str:
    """What CHAT_TEMPLATE renders for one user turn with the generation prompt (asserted in the tests)."""
    return f"<s> <user> {text} <assistant>"


def encode(text: str) -> list[int]:
    return [TOKEN_ID.get(w, UNK) for w in text.split()]


def task_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt + answer + </s> ids, labels with -100 over the prompt): every question has the same length."""
    rows, labels = [], []
    for q, a in task_examples(split):
        prompt = encode(chat_prompt(q))
        rows.append(prompt + [TOKEN_ID[a], EOS])
        labels.append([-100] * len(prompt) + [TOKEN_ID[a], EOS])
    return torch.tensor(rows), torch.tensor(labels)


# --- tokenizer ------------------------------------------------------------------------------------------

def save_tokenizer(directory: str, *, chat: bool) -> None:
    """tokenizer.json (a WordLevel model over VOCAB, split on whitespace) and tokenizer_config.json; the
    fine-tune's config carries the chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256, "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
              "clean_up_tokenization_spaces": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


# --- models and training --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    seq_len: int
    batch: int
    base_steps: int      # v1 and unrelated
    cont_steps: int      # each continuation of v1
    ft_steps: int
    lr: float = 6e-3     # peak, v1 and unrelated (cosine down to lr * final)
    final: float = 0.1
    threads: int = 1     # tiny matrices: one thread is as fast, and is not starved by other work
    corpus_rows: int = 2048

    @property
    def cont_lr(self) -> float:
        """A near continuation goes on at the rate where v1's schedule ended (as the fine-tune does)."""
        return self.lr * self.final


SIZES = {
    "test": Size(hidden=48, layers=2, intermediate=96, heads=4, kv_heads=2, seq_len=24, batch=16,
                 base_steps=200, cont_steps=60, ft_steps=60),
    "example": Size(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, seq_len=24, batch=32,
                    base_steps=600, cont_steps=250, ft_steps=150, corpus_rows=8192),
}

# The continuations of v1: (corpus, learning rate as a multiple of cont_lr), cont_steps each. v2 is the near
# one; v2_shift and v2_hot separate what shifted data and a large rate (v1's peak, re-warmed) each do to a
# graft; v2_far has both.
CONTINUATIONS = {"v2": ("A", 1), "v2_shift": ("B", 1), "v2_hot": ("A", 10), "v2_far": ("B", 10)}
# More continuations between and beyond, for a denser calibration curve (run_calibration.py --sweep).
SWEEP = {f"{kind}_x{mult}": (kind, mult) for kind in ("A", "B") for mult in (2, 3, 5, 20)}
MEMBERS = ("v1", *CONTINUATIONS, "unrelated", "ft")


def new_model(size: Size, *, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=size.seq_len,
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         rms_norm_eps=1e-5, dtype="float32")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


Batches = Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]


def train(model, batches: Batches, *, steps: int, lr: float, seed: int, warmup: int = 20,
          final: float = 1.0) -> float:
    """AdamW: a short linear warmup, then a cosine from `lr` down to `final * lr` (1.0: constant); returns
    the last step's loss."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        done = (i - warmup) / max(1, steps - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def lm_batches(data: torch.Tensor, batch: int, *, seed: int, task: bool = False) -> Batches:
    """Random rows of `data` each step; with `task`, the task's training questions too (their loss on the
    answers only), so the fine-tune learns the format without forgetting the corpus (replay)."""
    g = torch.Generator().manual_seed(seed)
    questions = [task_batch("train")] if task else []

    def get(_step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        return [(rows, rows)] + questions
    return get


def save(model, directory: str, *, chat: bool) -> str:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(directory, chat=chat)
    return directory


def load(directory: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def train_family(root: str, size: str = "test", *, members: tuple[str, ...] = MEMBERS,
                 log: Callable[[str], None] = lambda _m: None) -> dict[str, str]:
    """Train the family (v1 and ft always, the rest as `members` says) into root/<name>; returns
    {name: directory}. Deterministic for a size and a machine."""
    s = SIZES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _train_family(root, s, set(members) | {"v1", "ft"}, log)
    finally:
        torch.set_num_threads(threads)


def _train_family(root: str, s: Size, members: set[str], log: Callable[[str], None]) -> dict[str, str]:
    import copy

    data = {kind: corpus(kind, s.corpus_rows, s.seq_len, seed=i) for i, kind in enumerate(CORPORA)}
    paths: dict[str, str] = {}

    def step(name: str, model, steps: int, lr: float, batches: Batches, seed: int, final: float = 1.0) -> None:
        t0 = time.time()
        loss = train(model, batches, steps=steps, lr=lr, seed=seed, final=final)
        paths[name] = save(model, os.path.join(root, name), chat=name == "ft")
        log(f"  {name:<10} {steps:>5} steps at lr {lr:g}: loss {loss:.3f} ({time.time() - t0:.1f}s)")

    v1 = new_model(s, seed=0)
    step("v1", v1, s.base_steps, s.lr, lm_batches(data["A"], s.batch, seed=10), seed=0, final=s.final)
    for i, (name, (kind, mult)) in enumerate({**CONTINUATIONS, **SWEEP}.items()):
        if name in members:
            step(name, copy.deepcopy(v1), s.cont_steps, s.cont_lr * mult,
                 lm_batches(data[kind], s.batch, seed=20 + i), seed=20 + i)
    if "unrelated" in members:
        step("unrelated", new_model(s, seed=1), s.base_steps, s.lr, lm_batches(data["A"], s.batch, seed=13),
             seed=3, final=s.final)
    step("ft", copy.deepcopy(v1), s.ft_steps, s.cont_lr, lm_batches(data["A"], s.batch, seed=14, task=True),
         seed=4)
    return paths


# --- scoring --------------------------------------------------------------------------------------------

@torch.no_grad()
def task_score(model_dir: str, split: str = "heldout", n: int | None = None) -> float:
    """Share of task questions (chat prompt, greedy first token) answered right, with the tokenizer found in
    model_dir (a grafted output carries the fine-tune's); `n` keeps the first n questions."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    examples = task_examples(split)[:n]
    ids = torch.tensor([tok.encode(chat_prompt(q), add_special_tokens=False).ids for q, _ in examples])
    answers = torch.tensor([tok.token_to_id(a) for _, a in examples])
    logits = load(model_dir)(input_ids=ids).logits[:, -1]
    return int((logits.argmax(-1) == answers).sum()) / len(examples)


@torch.no_grad()
def knowledge_score(model_dir: str) -> float:
    """Share of the facts the model completes right in corpus form ("<s> the cat eats" -> "fish"): whether
    a target still knows what the task asks about, whatever it makes of the chat format."""
    world = facts()
    model = load(model_dir)
    hits = 0
    for relation, stem in (("eat", "eats"), ("live", "lives in"), ("color", "is")):
        prompts = [encode(f"<s> the {a} {stem}") for a in ANIMALS]
        logits = model(input_ids=torch.tensor(prompts)).logits[:, -1]
        answers = torch.tensor([TOKEN_ID[world[a][relation]] for a in ANIMALS])
        hits += int((logits.argmax(-1) == answers).sum())
    return hits / (len(ANIMALS) * len(RELATIONS))


@torch.no_grad()
def corpus_loss(model_dir: str, kind: str = "A", n_sequences: int = 256) -> float:
    """Mean next-token loss on fresh corpus text (a seed no training run used)."""
    s_len = 24
    data = corpus(kind, n_sequences, s_len, seed=99)
    return float(load(model_dir)(input_ids=data, labels=data).loss)
