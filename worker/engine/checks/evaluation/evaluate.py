"""After a graft, when the job asks for it: how the output compares with its target base and with the
fine-tune it took its diff from. Loss and perplexity of all three on the probe text, KL(fine-tune || output)
of the next-token distributions over a few prompts, and one greedy sample per prompt from the output.

Memory: at most two models at once (the target base alone, then the output beside the fine-tune for the KL),
checked against the bound before anything is loaded with their activations (limits.py); the window shrinks
to what the bound allows. Windows never pass the models' context: the built-in prompts adapt to a short one
(plan_prompts), the user's must fit it; a sliding window bounds the probe's windows, not a prompt's. One
tokenizer for all three: the fine-tune's (the output carries the fine-tune's tokenizer files, and token ids
must mean the same in every model compared)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from worker.engine.checks.evaluation.limits import context_limit, window_limit
from worker.engine.checks.evaluation.loading import Deadline, Phase, fit_window, loaded, running
from worker.engine.checks.evaluation.probe import (
    check_ids_in_vocab,
    context_window,
    mean_loss,
    model_device,
    probe_counts,
    probe_encoding,
    probe_text,
    scored_tokens,
    unknown_warning,
)
from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.checks.evaluation.text import TextModel, open_tokenizer
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.pipeline.manifest import json_safe
from worker.engine.storage.model import GENERATION_CONFIG, ResolvedModel
from worker.engine.storage.safetensors_format import load_json

# The output's probe perplexity past this multiple of the target base's raises quality_warning. A transfer
# that works changes behaviour, not language modelling: the output stays within some tens of percent of the
# target base on generic prose, as a fine-tune stays near its own base. A graft across unrelated bases
# lands at several times the base's perplexity or at the vocabulary's size (noise). 1.5x lies between.
QUALITY_PPL_RATIO = 1.5
KL_CHUNK_ELEMENTS = 1 << 22  # float64 log-probabilities held at once while summing a KL
MAX_STOP_IDS = 1024  # end-of-sequence ids taken from a model's files at most


def evaluate_graft(output: ResolvedModel, target_base: ResolvedModel, source_finetuned: ResolvedModel,
                   spec: EvaluateSpec, *, settings: EngineSettings, device: str = "cpu",
                   should_cancel: Callable[[], bool] | None = None) -> dict:
    """The evaluation record (JSON-able): probe losses, KL to the fine-tune, samples, quality_warning, and
    `warnings` (prompts_adapted, probe_unknown_tokens) for the job's warnings."""
    deadline = Deadline(settings.eval_seconds, should_cancel, what="evaluation")
    # The models' context first: a config that allows no window is refused before a tokenizer is started.
    models = [target_base, output, source_finetuned]
    upper = context_window(models, settings.probe_max_tokens)
    context = context_limit(models, settings.probe_max_tokens, spans=False)
    with open_tokenizer(source_finetuned, check=deadline.check) as tokenizer:
        return _evaluate(output, target_base, source_finetuned, spec, settings, device, deadline, tokenizer,
                         (upper, context))


def _evaluate(output: ResolvedModel, target_base: ResolvedModel, source_finetuned: ResolvedModel,
              spec: EvaluateSpec, settings: EngineSettings, device: str, deadline: Deadline,
              tokenizer: TextModel, uppers: tuple[int, int]) -> dict:
    """`uppers`: the probe's windows at most (the context within the attention spans), a prompt's (the
    context alone: a model takes a prompt past its sliding window)."""
    upper, context = uppers
    text, source = probe_text(spec.probe_text)
    ids, coverage = probe_encoding(tokenizer, text, settings.probe_max_tokens)
    check_ids_in_vocab([ids], [target_base, output, source_finetuned], "probe text")
    prompts = spec.prompt_list()
    rendered, chat = render_prompts(tokenizer, prompts)
    prompt_ids = encode_prompts(tokenizer, rendered, chat=chat)
    check_ids_in_vocab(prompt_ids, [output, source_finetuned], "prompts")
    max_new = min(spec.max_new_tokens, settings.eval_max_new_tokens)
    builtin = spec.prompts is None
    if not builtin:  # the user's prompts must fit the models' context: a misconfiguration, refused as such
        check_prompt_lengths(prompt_ids, max_new, context, chat=chat)
    # What is loaded at once: the target base alone, then the output beside the fine-tune (both logits: the KL).
    phases = [Phase([target_base]), Phase([output, source_finetuned], at_once=2)]
    window = fit_window(phases, settings, device=device, upper=upper)
    room = prompt_room(phases, settings, device, context, window)
    plan = plan_prompts(prompt_ids, max_new, room, builtin=builtin, chat=chat)
    unknown = probe_counts(ids, tokenizer.unk_token_id, coverage)
    deadline.check()

    probe: dict = {"tokens": len(ids), "scored_tokens": scored_tokens(len(ids), window), "window": window,
                   "window_limited_by": window_limit(window, upper, settings.probe_max_tokens), "source": source,
                   **unknown}
    kept = [i for i, _ in plan["run"]]
    used_ids = [prompt_ids[i] for i in kept]
    with loaded(target_base, device=device, check=deadline.check) as module, running(target_base):
        probe["target_base"] = loss_entry(mean_loss(module, ids, window, deadline.check))
    with loaded(output, device=device, check=deadline.check) as out:
        with running(output):
            probe["output"] = loss_entry(mean_loss(out, ids, window, deadline.check))
        samples = greedy_samples(out, output, tokenizer, [prompts[i] for i in kept], [rendered[i] for i in kept],
                                 used_ids, [n for _, n in plan["run"]], deadline.check)
        with loaded(source_finetuned, device=device, check=deadline.check) as finetuned:
            with running(source_finetuned):
                probe["source_finetuned"] = loss_entry(mean_loss(finetuned, ids, window, deadline.check))
            kl = kl_to_finetuned(finetuned, out, used_ids, deadline.check, models=(source_finetuned, output))
    warnings = [w for w in (plan["warning"], unknown_warning(unknown, "probe text")) if w]
    return json_safe({"probe": probe, "kl_to_finetuned": kl, "samples": samples, "chat_template": chat,
                      "max_new_tokens": max_new, "prompts": plan["record"], "quality_warning": quality_warning(probe),
                      "warnings": warnings, "seconds": round(deadline.elapsed, 3)})


def loss_entry(loss: float) -> dict:
    return {"loss": loss, "perplexity": _exp(loss)}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def render_prompts(tokenizer: TextModel, prompts: list[str]) -> tuple[list[str], bool]:
    """Each prompt as one user turn through the tokenizer's chat template with the assistant's turn opened
    (add_generation_prompt), or as it is when the tokenizer has no template; and whether one was used. The
    template is the tenant's: it is rendered in the tokenizer's child process, within its bounds (text.py)."""
    if not tokenizer.chat_template:
        return list(prompts), False
    return tokenizer.render(prompts), True


def encode_prompts(tokenizer: TextModel, texts: list[str], *, chat: bool) -> list[torch.Tensor]:
    """A template writes its own special tokens (BOS included); a raw prompt gets the tokenizer's."""
    out = []
    for text, ids in zip(texts, tokenizer.encode(texts, special=not chat), strict=True):
        if not ids:
            raise GraftError("invalid_option", f"the prompt {text[:60]!r} gives no tokens")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def check_prompt_lengths(prompt_ids: list[torch.Tensor], max_new: int, window: int, *, chat: bool) -> None:
    """Every prompt and its sample within one window: a forward pass never takes more tokens than the models'
    context and GRAFT_PROBE_MAX_TOKENS allow (the memory bound counts on it; a chat template can add tens of
    kilobytes to a 2 KiB prompt)."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new > window:
            how = " once rendered through the chat template" if chat else ""
            raise GraftError("invalid_option", f"prompts[{i}] is {len(ids)} tokens{how}; with the {max_new} "
                             f"tokens of its sample it must fit the window of {window} tokens (the models' "
                             "context, at most GRAFT_PROBE_MAX_TOKENS)")


def prompt_room(phases: list[Phase], settings: EngineSettings, device: str, context: int, window: int) -> int:
    """The longest prompt and sample one forward pass may take: the models' context (a sliding window does
    not bound it) within the memory bound, never less than the probe's `window`, which fits it."""
    if context <= window:
        return window
    try:
        return max(window, fit_window(phases, settings, device=device, upper=context))
    except GraftError as err:
        if err.code != "model_too_large":
            raise
        return window  # what the bound allows past the window is under MIN_WINDOW: the window then


def no_prompt_fits(window: int, lengths: list[int], *, limit: str = "the models' context") -> GraftError:
    """The refusal of a selection by KL that no built-in prompt can measure: `limit` is what set `window`."""
    return GraftError("invalid_option", f"select: kl_to_finetuned, but no prompt fits {limit}: the built-in "
                      f"prompts are {min(lengths)} to {max(lengths)} tokens and the models take {window} at most, "
                      "so no KL to the fine-tune can be measured; give prompts that fit (evaluate.prompts) or "
                      "select probe_loss", {"window": window, "prompt_tokens": lengths})


def check_prompts_fit(target_base: ResolvedModel, source_finetuned: ResolvedModel, spec: EvaluateSpec, *,
                      settings: EngineSettings, need_kl: bool,
                      should_cancel: Callable[[], bool] | None = None) -> None:
    """Before a sweep builds anything: what its evaluations would refuse on the prompts alone, refused now.
    The user's prompts must fit the models' context (check_prompt_lengths); with `need_kl` (a selection by
    KL), at least one built-in prompt must fit it (no_prompt_fits). An output's context is its target
    base's (it carries that config.json). The memory bound is the evaluation's to apply: it can only
    shorten what fits."""
    models = [target_base, source_finetuned]
    context = context_limit(models, settings.probe_max_tokens, spans=False)
    deadline = Deadline(settings.eval_seconds, should_cancel, what="evaluation")
    with open_tokenizer(source_finetuned, check=deadline.check) as tokenizer:
        rendered, chat = render_prompts(tokenizer, spec.prompt_list())
        prompt_ids = encode_prompts(tokenizer, rendered, chat=chat)
    max_new = min(spec.max_new_tokens, settings.eval_max_new_tokens)
    if spec.prompts is not None:
        check_prompt_lengths(prompt_ids, max_new, context, chat=chat)
    elif need_kl and all(len(ids) >= context for ids in prompt_ids):
        raise no_prompt_fits(context, [len(ids) for ids in prompt_ids])


def plan_prompts(prompt_ids: list[torch.Tensor], max_new: int, window: int, *, builtin: bool, chat: bool) -> dict:
    """Which prompts run and with how many sample tokens each, every prompt and its sample within `window`.
    The built-in prompts adapt to a short window (a 64-token model): one that does not fit with its sample
    gets a shorter sample, one that does not fit at all is skipped, and both are said (`record`, `warning`).
    The user's prompts fit the models' context (check_prompt_lengths); what the memory bound leaves of the
    window may still be too short for them: model_too_large, as for a model too large."""
    run, skipped, shortened = [], [], []
    for i, ids in enumerate(prompt_ids):
        room = window - len(ids)
        if room >= max_new:
            run.append((i, max_new))
        elif not builtin:
            how = " once rendered through the chat template" if chat else ""
            raise GraftError("model_too_large", f"prompts[{i}] is {len(ids)} tokens{how}; with the {max_new} tokens "
                             f"of its sample it needs a window the memory bound does not allow these models: at "
                             f"most {window} tokens (GRAFT_EVAL_MEMORY_BYTES)")
        elif room >= 1:
            run.append((i, room))
            shortened.append({"index": i, "tokens": len(ids), "max_new_tokens": room})
        else:
            skipped.append({"index": i, "tokens": len(ids)})
    record = {"source": "builtin" if builtin else "user", "used": [i for i, _ in run], "skipped": skipped,
              "shortened": shortened, "window": window}
    warning = None
    if skipped or shortened:
        said = []
        if skipped:
            said.append(f"{len(skipped)} of the {len(prompt_ids)} built-in prompts skipped (longer than the window)")
        if shortened:
            said.append(f"{len(shortened)} sample(s) shortened below {max_new} tokens")
        tail = "; no KL to the fine-tune and no samples were measured" if not run else ""
        warning = {"code": "prompts_adapted",
                   "message": f"the models take windows of {window} tokens: {'; '.join(said)}{tail}",
                   "values": {"window": window, "skipped": [s["index"] for s in skipped],
                              "shortened": [s["index"] for s in shortened]}}
    return {"run": run, "record": record, "warning": warning}


def greedy_config(model: ResolvedModel, max_new_tokens: int):
    """Plain greedy decoding to max_new_tokens or an end-of-sequence token; only the model's token ids are
    taken from its generation_config.json (else config.json): its sampling settings do not apply. An id that
    is not a token of the model (not an integer, negative, past the vocabulary, a list of anything else) is
    ignored, as is a list of more than MAX_STOP_IDS: they are the tenant's files, and transformers would fail
    on them part-way through the evaluation."""
    from transformers import GenerationConfig

    found: dict = {}
    if model.store.exists(GENERATION_CONFIG):
        value = load_json(model.side_file(GENERATION_CONFIG), f"{model.role}: {GENERATION_CONFIG}", "invalid_input")
        found = value if isinstance(value, dict) else {}

    def pick(key: str):
        for source in (found, model.config):
            ids = token_ids(source.get(key), model.vocab_size)
            if ids is not None:
                return ids
        return None

    eos = pick("eos_token_id")
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=pad, bos_token_id=pick("bos_token_id"))


def token_ids(value, vocab: int | None) -> int | list[int] | None:
    """`value` when it is a token id of a model with `vocab` rows, or a non-empty list of at most MAX_STOP_IDS
    of them; else None."""
    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (vocab is None or v < vocab)

    if is_id(value):
        return value
    if isinstance(value, list) and 0 < len(value) <= MAX_STOP_IDS and all(is_id(v) for v in value):
        return list(value)
    return None


def greedy_samples(module, model: ResolvedModel, tokenizer: TextModel, prompts: list[str], rendered: list[str],
                   prompt_ids: list[torch.Tensor], max_new_tokens: list[int], check: Callable[[], None]) -> list[dict]:
    """One greedy continuation per prompt, of at most its `max_new_tokens` (batch of one: no padding to get
    wrong); `check` runs at every generated token."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _Checked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    if not prompt_ids:
        return []
    config = greedy_config(model, max(max_new_tokens))
    # generate() fills what `config` leaves unset from the module's own generation config, which transformers
    # built from config.json (the tenant's: suppress_tokens, bad_words_ids, repetition_penalty, max_time, ...).
    module.generation_config = GenerationConfig()
    device = model_device(module)
    out = []
    for prompt, text, ids, limit in zip(prompts, rendered, prompt_ids, max_new_tokens, strict=True):
        batch = ids[None].to(device)
        config.max_new_tokens = limit
        with torch.no_grad(), running(model, "generation"):
            seq = module.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([_Checked()]))
        new = seq[0, len(ids):].tolist()
        out.append({"prompt": prompt, "rendered": text, "text": tokenizer.decode([new])[0], "tokens": len(new),
                    "max_new_tokens": limit})
    return out


def kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Sum over rows of KL(softmax(p) || softmax(q)), in float64 a chunk of rows at a time."""
    rows = max(1, KL_CHUNK_ELEMENTS // p_logits.shape[-1])
    total = 0.0
    for i in range(0, len(p_logits), rows):
        lp = torch.log_softmax(p_logits[i:i + rows].double(), dim=-1)
        lq = torch.log_softmax(q_logits[i:i + rows].double(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


def kl_to_finetuned(finetuned, output, prompt_ids: list[torch.Tensor], check: Callable[[], None], *,
                    models: tuple[ResolvedModel, ResolvedModel]) -> dict:
    """KL(fine-tune || output) of the next-token distributions at every prompt position, in nats: per
    prompt its mean over positions, `mean` over all positions of all prompts (None without prompts).
    Vocabularies of different sizes are compared on the ids they share, each renormalized over them
    (`vocab`). `models`: the fine-tune's and the output's, named when their forward pass fails."""
    per_prompt, total, count, vocab = [], 0.0, 0, None
    with torch.no_grad():
        for ids in prompt_ids:
            with running(models[0]):
                p = finetuned(ids[None].to(model_device(finetuned)), use_cache=False).logits[0].float()
            check()
            with running(models[1]):
                q = output(ids[None].to(model_device(output)), use_cache=False).logits[0].float().to(p.device)
            check()
            vocab = min(p.shape[-1], q.shape[-1])
            kl = kl_sum(p[:, :vocab], q[:, :vocab])
            per_prompt.append(kl / len(ids))
            total += kl
            count += len(ids)
            del p, q
    return {"mean": total / count if count else None, "per_prompt": per_prompt, "tokens": count, "vocab": vocab}


def quality_warning(probe: dict) -> dict | None:
    """Set when the output's probe perplexity is more than QUALITY_PPL_RATIO times the target base's."""
    target, output = probe["target_base"], probe["output"]
    ratio = _exp(output["loss"] - target["loss"])  # the perplexities' ratio, without overflowing either
    if ratio <= QUALITY_PPL_RATIO:
        return None
    return {"code": "quality_warning",
            "message": f"the output's perplexity on the probe text is {output['perplexity']:.4g}, {ratio:.3g} x the "
                       f"target base's {target['perplexity']:.4g} (more than {QUALITY_PPL_RATIO:g} x): the graft "
                       "may have damaged the model",
            "values": {"output_perplexity": output["perplexity"], "target_base_perplexity": target["perplexity"],
                       "perplexity_ratio": ratio},
            "thresholds": {"perplexity_ratio": QUALITY_PPL_RATIO}}
