"""The models run within their limits (issue 13, items 5-8): the context transformers builds from a config
(GPT-2's n_positions, a sliding window, a text_config), a context under 2 refused, the model that failed
named; the memory bound counting attention, logits and cache (a window shrunk to fit, or a refusal, never an
allocation past the bound); the built-in prompts adapting to a short context; the probe's unknown tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from eval_helpers import CHAT_TEMPLATE, VOCAB, bigram_state, encode, reference_loss, resolve, save, tokenizer_files

from worker.devtools.sample_models import LlamaShape, llama_state, perturb, save_checkpoint
from worker.engine.checks.evaluation import EvaluateSpec, evaluate_graft
from worker.engine.checks.evaluation import loading as loading_module
from worker.engine.checks.evaluation.limits import activation_bytes, model_context
from worker.engine.checks.evaluation.loading import Phase, fit_window, memory_limit, parameter_bytes
from worker.engine.checks.evaluation.probe import builtin_probe_text
from worker.engine.checks.evaluation.spec import DEFAULT_PROMPTS
from worker.engine.checks.inspect.function import function_probe
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftError
from worker.engine.verdict import PROBE_UNKNOWN_SHARE, combine, function_reasons

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GPT2_POSITIONS = 64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


def _gpt2_state(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=GPT2_POSITIONS, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    module = GPT2LMHeadModel(config)
    # Tied: the head is the embedding, stored once.
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items() if k != "lm_head.weight"}
    return state, config.to_dict()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Three GPT-2s of 64 positions (config.json has n_positions, no max_position_embeddings): a base, a
    fine-tune and an output near it; the fine-tune's tokenizer has no chat template, so the built-in prompts
    are 46 to 76 tokens as they are."""
    root = tmp_path_factory.mktemp("gpt2")
    state, config = _gpt2_state(0)
    assert config["n_positions"] == GPT2_POSITIONS and "max_position_embeddings" not in config
    plain = tokenizer_files()
    states = {"base": state, "finetuned": perturb(state, seed=1, scale=0.1),
              "output": perturb(state, seed=2, scale=0.02)}
    return {name: save_checkpoint(str(root / name), s, config, tokenizer=plain) for name, s in states.items()}


def _models(paths: dict, **roles: str) -> dict:
    return {role: resolve(paths[name], role) for role, name in roles.items()}


def _close(models: dict) -> None:
    for m in models.values():
        m.store.close()


def _evaluate(paths: dict, spec: EvaluateSpec | None = None, *, output="output", target="base",
              finetuned="finetuned", **settings) -> dict:
    m = _models(paths, output=output, target_base=target, source_finetuned=finetuned)
    try:
        return evaluate_graft(m["output"], m["target_base"], m["source_finetuned"], spec or EvaluateSpec(),
                              settings=EngineSettings(**{"probe_max_tokens": 300, **settings}))
    finally:
        _close(m)


def _never_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading_module, "load_causal_lm", refuse)


# --- 5. the context transformers builds -------------------------------------------------------------------

def test_gpt2_of_64_positions_is_evaluated_in_64_token_windows(gpt2):
    """It failed with model_failed (IndexError: positions past the 64-row table) in 300-token windows."""
    from transformers import GPT2LMHeadModel

    result = _evaluate(gpt2, EvaluateSpec(max_new_tokens=32))
    probe = result["probe"]
    assert (probe["window"], probe["window_limited_by"], probe["tokens"]) == (64, "context", 300)
    ids = encode(builtin_probe_text())[:300]
    for role, name in (("target_base", "base"), ("output", "output"), ("source_finetuned", "finetuned")):
        reference = GPT2LMHeadModel.from_pretrained(gpt2[name], dtype=torch.float64).eval()
        assert probe[role]["loss"] == pytest.approx(reference_loss(reference, ids, 64), rel=1e-5), role


def test_builtin_prompts_adapt_to_a_64_token_context(gpt2):
    """7: the built-in prompts (46-76 tokens with their BOS) and 32-token samples do not fit 64 tokens: one
    that fits gets a shorter sample, one that does not is skipped; both said, and the evaluation runs."""
    result = _evaluate(gpt2, EvaluateSpec(max_new_tokens=32))
    lengths = [len(encode(p)) for p in DEFAULT_PROMPTS]
    assert min(lengths) < 64 <= max(lengths)
    fits = [i for i, n in enumerate(lengths) if n < 64]
    record = result["prompts"]
    assert record["source"] == "builtin" and record["used"] == fits
    assert record["skipped"] == [{"index": i, "tokens": n} for i, n in enumerate(lengths) if n >= 64]
    assert record["shortened"] == [{"index": i, "tokens": lengths[i], "max_new_tokens": 64 - lengths[i]}
                                   for i in fits if lengths[i] + 32 > 64]
    assert [s["prompt"] for s in result["samples"]] == [DEFAULT_PROMPTS[i] for i in fits]
    for sample, i in zip(result["samples"], fits, strict=True):
        assert sample["max_new_tokens"] == min(32, 64 - lengths[i]) and sample["tokens"] <= sample["max_new_tokens"]
    assert result["kl_to_finetuned"]["tokens"] == sum(lengths[i] for i in fits)
    (warning,) = result["warnings"]
    assert warning["code"] == "prompts_adapted" and "64 tokens" in warning["message"]
    # The user's prompts are theirs to fit: one past the context is refused before any model is loaded.
    with pytest.raises(GraftError) as err:
        _evaluate(gpt2, EvaluateSpec(prompts=["x" * 60], max_new_tokens=8))
    assert err.value.code == "invalid_option" and "window of 64 tokens" in err.value.message


def test_a_graft_on_a_64_token_model_evaluates_and_says_what_it_adapted(gpt2, tmp_path):
    """7, end to end: `--evaluate` without prompts on a 64-token model publishes the graft (it failed it with
    invalid_option), and the adaptation is one of the job's warnings and in the manifest, not only inside the
    evaluation record."""
    from worker.engine import GraftOptions, GraftRequest
    from worker.engine.checks.checked_graft import Checks, run_checked_graft

    out = str(tmp_path / "out")
    warned: list[dict] = []
    request = GraftRequest.single(gpt2["base"], gpt2["finetuned"], gpt2["output"], out, GraftOptions(alpha=0.5))
    result = run_checked_graft(request, Checks(evaluate=EvaluateSpec(max_new_tokens=32)), warn=warned.append,
                               settings=EngineSettings(cache_dir="", probe_max_tokens=300))
    with open(os.path.join(out, "graft-manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["evaluation"]["prompts"]["skipped"] and manifest["evaluation"]["probe"]["window"] == 64
    assert "prompts_adapted" in [w["code"] for w in warned]
    assert "prompts_adapted" in [w["code"] for w in manifest["warnings"]]
    assert result.checks["evaluation"]["prompts"]["used"]


def test_no_builtin_prompt_fits_a_tiny_context(tmp_path):
    """A context shorter than every built-in prompt: the probe is still scored, the KL and samples are not."""
    ids = encode(builtin_probe_text())
    path = save(str(tmp_path / "m"), bigram_state(ids, seed=0), tokenizer=tokenizer_files(), max_positions=16)
    result = _evaluate({"m": path}, output="m", target="m", finetuned="m")
    assert result["probe"]["window"] == 16
    assert result["samples"] == [] and result["kl_to_finetuned"]["mean"] is None
    assert [s["index"] for s in result["prompts"]["skipped"]] == [0, 1, 2, 3]
    assert "no KL" in result["warnings"][0]["message"]
    json.dumps(result, allow_nan=False)


def test_the_cli_reports_an_evaluation_with_nothing_to_compare(tmp_path, capsys):
    """A context shorter than every built-in prompt leaves the KL unmeasured (null): `graft run --evaluate`
    prints it as such, and the adaptation as a warning (formatting None as a number raised a TypeError after
    the graft was published)."""
    from worker.cli import main
    from worker.devtools.sample_models import perturb

    ids = encode(builtin_probe_text())
    base = bigram_state(ids, seed=0)
    paths = {name: save(str(tmp_path / name), state, tokenizer=tokenizer_files(), max_positions=16)
             for name, state in (("base", base), ("ft", perturb(base, seed=1, scale=0.05)),
                                 ("target", perturb(base, seed=2, scale=0.01)))}
    out = str(tmp_path / "out")
    assert main(["run", "--source-base", paths["base"], "--source-finetuned", paths["ft"], "--target-base",
                 paths["target"], "--output", out, "--evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "KL(fine-tune || output) on the prompts: n/a" in printed
    assert "warning:" in printed and os.path.exists(os.path.join(out, "graft-manifest.json"))


def test_gpt2_of_64_positions_is_function_level_inspected(gpt2):
    m = _models(gpt2, source_base="base", target_base="output")
    try:
        result = function_probe(m["source_base"], m["target_base"], m["source_base"], text=None,
                                settings=EngineSettings(probe_max_tokens=300))
    finally:
        _close(m)
    assert result["window"] == 64 and result["scored_tokens"] == 300 - 5
    assert all(0 < loss < 10 for loss in result["losses"])


@pytest.mark.parametrize("key", ["max_position_embeddings", "n_positions"])
@pytest.mark.parametrize("value", [1, 0, -4])
def test_context_under_two_is_refused_before_anything_runs(tmp_path, monkeypatch, key, value):
    """Each key in a config of a type that reads it (n_positions: GPT-2's; a Llama reads no such key)."""
    _never_load(monkeypatch)
    ids = encode("abc abd")

    def model(name: str, **changes) -> str:
        path = save(str(tmp_path / name), bigram_state(ids, seed=0), tokenizer=tokenizer_files())
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
        if key == "n_positions":  # GPT-2's max_position_embeddings is an alias of n_positions
            config = {**{k: v for k, v in config.items() if k != "max_position_embeddings"}, "model_type": "gpt2"}
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump({**config, **changes}, fh)
        return path

    paths = {"ok": model("ok"), "m": model("m", **{key: value})}
    with pytest.raises(GraftError) as err:
        _evaluate(paths, output="ok", target="m", finetuned="ok")
    assert err.value.code == "invalid_input" and "target_base" in err.value.message and key in err.value.message
    m = _models(paths, source_base="ok", target_base="m")
    try:
        with pytest.raises(GraftError) as err:
            function_probe(m["source_base"], m["target_base"], m["source_base"], text=None, settings=EngineSettings())
    finally:
        _close(m)
    assert err.value.code in ("invalid_input", "config_mismatch")


def _with_config(tmp_path, name: str, **changes) -> str:
    path = save(str(tmp_path / name), bigram_state(encode("abc"), seed=0), tokenizer=tokenizer_files())
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({**config, **changes}, fh)
    return path


def test_context_from_sliding_windows_and_text_configs(tmp_path):
    def context(**changes):
        return model_context(resolve(_with_config(tmp_path, f"c{len(os.listdir(tmp_path))}", **changes), "m"))

    assert context() == 2048
    assert context(model_type="mistral", sliding_window=48) == 48
    assert context(model_type="mistral", sliding_window=None) == 2048
    assert context(model_type="qwen2", sliding_window=40, use_sliding_window=False) == 2048
    assert context(model_type="qwen2", sliding_window=40, use_sliding_window=True) == 40
    text = {"model_type": "llama", "max_position_embeddings": 40, "vocab_size": VOCAB}
    assert context(model_type="llava", text_config=text) == 40
    with pytest.raises(GraftError) as err:
        context(model_type="llava", text_config={**text, "max_position_embeddings": 1})
    assert err.value.code == "invalid_input"


def test_the_model_that_failed_is_named(tmp_path, monkeypatch):
    """A forward pass of the output failing in the KL, the fine-tune loaded beside it: the output is named
    (the fine-tune was: the innermost model loaded took the blame)."""
    from transformers import LlamaForCausalLM

    ids = encode(builtin_probe_text())
    state = bigram_state(ids, seed=0)
    plain = save(str(tmp_path / "plain"), state, tokenizer=tokenizer_files())
    marked = _with_config(tmp_path, "marked", fails_in_the_kl=True)
    real = LlamaForCausalLM.forward

    def forward(self, input_ids=None, *args, **kwargs):
        # Short inputs, no cache asked for: the KL's passes (generate() asks for its cache, the probe is longer).
        if getattr(self.config, "fails_in_the_kl", False) and not kwargs.get("use_cache") and input_ids.shape[1] < 20:
            raise IndexError("index out of range in self")
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    with pytest.raises(GraftError) as err:
        _evaluate({"plain": plain, "marked": marked}, EvaluateSpec(prompts=["hi"], max_new_tokens=2), output="marked",
                  target="plain", finetuned="plain", probe_max_tokens=64)
    assert err.value.code == "model_failed" and "IndexError" in err.value.message
    assert "output" in err.value.message and "source_finetuned" not in err.value.message


# --- 6. memory: attention, logits, cache ------------------------------------------------------------------

def _many_heads(directory: str, heads: int) -> str:
    """A Llama of head_dim 1: `heads` heads of one dimension each (a few hundred KB of weights)."""
    shape = LlamaShape(vocab=VOCAB, hidden=heads, layers=1, intermediate=64, heads=heads, kv_heads=heads)
    return save_checkpoint(directory, llama_state(shape, seed=0), shape.config(), tokenizer=tokenizer_files())


BUDGET = 192 << 20


@pytest.mark.parametrize("heads", [256, 1024])
def test_attention_of_many_heads_shrinks_the_window_to_the_budget(tmp_path, heads):
    """The issue's bases: 0.8 MB of weights passed the parameter count, then took 4.8 GB (256 heads) and
    16 GiB in one allocation (1024) in 2048-token windows. The window is what the budget allows."""
    model = resolve(_many_heads(str(tmp_path / "m"), heads), "target_base")
    settings = EngineSettings(eval_memory_bytes=BUDGET)
    fixed = parameter_bytes(model) + loading_module.module_overhead_bytes(model)
    assert fixed + activation_bytes(2048, [model]) > 20 * BUDGET  # the old window: far past the budget
    window = fit_window([Phase([model])], settings, upper=2048)
    assert 32 <= window < 2048
    assert fixed + activation_bytes(window, [model]) <= BUDGET < fixed + activation_bytes(window + 1, [model])
    # The attention alone at that window: heads x window^2 float32 values, within the budget.
    assert heads * window * window * 4 < BUDGET
    # Too little for even MIN_WINDOW tokens: refused before anything is loaded.
    with pytest.raises(GraftError) as err:
        fit_window([Phase([model])], EngineSettings(eval_memory_bytes=fixed + activation_bytes(31, [model])),
                   upper=2048)
    assert err.value.code == "model_too_large"


MEASURE = r"""
import json, os, resource, sys
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import torch
torch.set_num_threads(1)
from eval_helpers import resolve
from worker.engine.config import EngineSettings
from worker.engine.checks.evaluation import EvaluateSpec, evaluate_graft

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

def run(cap):
    models = [resolve(PATH, role) for role in ("output", "target_base", "source_finetuned")]
    try:
        return evaluate_graft(*models, EvaluateSpec(prompts=["hi"], max_new_tokens=2),
                              settings=EngineSettings(eval_memory_bytes=BUDGET, probe_max_tokens=cap))
    finally:
        for m in models:
            m.store.close()

run(40)  # imports and caches settle first
# What an unbounded window would take (gigabytes) fails here, not on the machine.
limit = status("VmSize") + (1536 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))  # soft: the tokenizer child sets its own
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak resident size starts again from here
before = status("VmRSS")
try:
    window = run(2048)["probe"]["window"]
    error = None
except Exception as exc:
    window, error = None, f"{type(exc).__name__}: {exc}"
print(json.dumps({"window": window, "error": error, "grew": status("VmHWM") - before}))
"""


def test_a_many_headed_evaluation_stays_within_its_budget(tmp_path):
    """Run for real (in a process of its own, so its peak resident memory is its own): the evaluation of
    the 256-head model runs in the window fit_window plans, and its peak stays within the budget."""
    path = _many_heads(str(tmp_path / "m"), 256)
    script = MEASURE.replace("ROOT", repr(ROOT)).replace("PATH", repr(path)).replace("BUDGET", str(BUDGET))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["error"] is None, found["error"]
    model = resolve(path, "target_base")
    planned = fit_window([Phase([model]), Phase([model, model], at_once=2)], EngineSettings(eval_memory_bytes=BUDGET),
                         upper=2048)
    assert found["window"] == planned < 2048
    assert 0 < found["grew"] <= BUDGET, found


def test_the_budget_counts_the_logits_and_the_attention(tmp_path):
    """The same parameters, a wider vocabulary or more heads: more activations at one window."""
    small = resolve(_many_heads(str(tmp_path / "a"), 4), "m")
    many = resolve(_many_heads(str(tmp_path / "b"), 64), "m")
    assert activation_bytes(512, [many]) - activation_bytes(512, [small]) >= 60 * 512 * 512 * 4
    # The KL's phase holds two models' logits.
    assert (activation_bytes(512, [small], at_once=2) - activation_bytes(512, [small])
            == 3 * 512 * VOCAB * 4)
    assert memory_limit(EngineSettings(eval_memory_bytes=1000))[0] <= 1000


# --- 8. unknown tokens in the probe ---------------------------------------------------------------------

def _letters_tokenizer() -> dict:
    """A character tokenizer of lowercase letters, space and full stop: anything else (a newline) is <unk>."""
    from tokenizers import Tokenizer, models, processors

    alphabet = "abcdefghijklmnopqrstuvwxyz ."
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: 3 + i for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": config}


LINES = "the cat sat on the mat.\nthe dog sat on the log.\n" * 4


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    root = tmp_path_factory.mktemp("letters")
    base = bigram_state(encode(LINES), seed=0)
    tok = _letters_tokenizer()
    return {"base": save(str(root / "base"), base, tokenizer=tok),
            "near": save(str(root / "near"), perturb(base, seed=1, scale=0.02), tokenizer=tok)}


def test_probe_unknown_tokens_are_counted_and_warned(letters):
    newlines = LINES.count("\n")
    tokens = len(LINES) + 1  # a token per character, and the BOS
    share = newlines / tokens
    assert share > PROBE_UNKNOWN_SHARE
    result = _evaluate(letters, EvaluateSpec(probe_text=LINES, prompts=["the cat"], max_new_tokens=2),
                       output="near", target="base", finetuned="base")
    probe = result["probe"]
    assert (probe["tokens"], probe["unknown_tokens"]) == (tokens, newlines)
    assert probe["unknown_share"] == pytest.approx(share)
    (warning,) = result["warnings"]
    assert warning["code"] == "probe_unknown_tokens" and f"{share:.1%}" in warning["message"]
    assert warning["thresholds"] == {"unknown_share": PROBE_UNKNOWN_SHARE, "dropped_share": PROBE_UNKNOWN_SHARE}
    # The newlines mapped to <unk> are characters its tokens do not spell, too.
    assert (probe["characters"], probe["characters_dropped"]) == (len(LINES), newlines)
    clean = _evaluate(letters, EvaluateSpec(probe_text=LINES.replace("\n", " "), prompts=["the cat"],
                                            max_new_tokens=2), output="near", target="base", finetuned="base")
    assert (clean["probe"]["unknown_tokens"], clean["probe"]["unknown_share"], clean["warnings"]) == (0, 0.0, [])


def test_function_level_reports_unknown_tokens_and_trusts_no_barrier(letters):
    m = _models(letters, source_base="base", target_base="near")
    try:
        result = function_probe(m["source_base"], m["target_base"], m["source_base"], text=LINES,
                                settings=EngineSettings())
        clean = function_probe(m["source_base"], m["target_base"], m["source_base"], text=LINES.replace("\n", " "),
                               settings=EngineSettings())
    finally:
        _close(m)
    assert result["unknown_tokens"] == LINES.count("\n") and result["unknown_share"] > PROBE_UNKNOWN_SHARE
    (r,) = function_reasons(result)
    assert r["code"] == "probe_unknown_tokens" and r["verdict"] == "risky"
    assert r["values"]["measured_code"] == "loss_barrier"
    assert [c["code"] for c in function_reasons(clean)] == ["loss_barrier"] and clean["unknown_share"] == 0.0
    # It overrules nothing: the weights level's incompatible stands.
    weights = {"code": "bases_unrelated", "level": "weights", "verdict": "incompatible", "message": "", "values": {},
               "thresholds": {}}
    verdict, _ = combine([weights, r], ["headers", "weights", "function"])
    assert verdict == "incompatible"
    verdict, _ = combine([weights, *function_reasons(clean)], ["headers", "weights", "function"])
    assert verdict == "risky"


def test_a_byte_level_tokenizer_has_no_unknown_tokens(tmp_path):
    path = save(str(tmp_path / "m"), bigram_state(encode(LINES), seed=0), tokenizer=tokenizer_files())
    result = _evaluate({"m": path}, EvaluateSpec(probe_text=LINES, prompts=["hi"], max_new_tokens=1), output="m",
                       target="m", finetuned="m")
    assert (result["probe"]["unknown_tokens"], result["warnings"]) == (0, [])


def test_how_a_module_runs_is_not_the_configs_to_say(tmp_path):
    """A config naming an attention implementation (a kernel from the hub, say) or asking for every layer's
    attention probabilities and hidden states (L x heads x T^2 past the memory model) is not followed."""
    from worker.engine.checks.evaluation import load_causal_lm

    path = _with_config(tmp_path, "m", attn_implementation="kernels-community/flash-attn",
                        _attn_implementation_internal="flex_attention", output_attentions=True,
                        output_hidden_states=True, return_dict=False)
    model = resolve(path, "output")
    module = load_causal_lm(model)
    assert module.config._attn_implementation in ("sdpa", "eager")
    out = module(torch.tensor([encode("abc")]), use_cache=False)
    assert out.attentions is None and out.hidden_states is None and out.logits.shape[1] == 4
    assert model.config["output_attentions"] is True  # the model's own config as it was read


# --- review: a KL sweep that no prompt can measure ------------------------------------------------------

def _sweep_trio(tmp_path, **save_kwargs) -> dict:
    from worker.devtools.sample_models import perturb

    base = bigram_state(encode(builtin_probe_text()), seed=0)
    return {name: save(str(tmp_path / name), state, tokenizer=tokenizer_files(), **save_kwargs)
            for name, state in (("base", base), ("ft", perturb(base, seed=1, scale=0.05)),
                                ("target", perturb(base, seed=2, scale=0.01)))}


def _sweep(paths: dict, out: str, checks, monkeypatch, **settings) -> tuple[list[str], object]:
    """Run a sweep over alphas 0.5 and 1; (the outputs run_graft was asked to build, the error raised)."""
    from worker.engine import GraftOptions, GraftRequest
    from worker.engine.checks.checked_graft import run_checked_graft
    from worker.engine.pipeline import graft as run_module

    built: list[str] = []
    real = run_module.run_graft

    def counting(request, **kwargs):
        built.append(request.output)
        return real(request, **kwargs)

    monkeypatch.setattr(run_module, "run_graft", counting)
    request = GraftRequest.single(paths["base"], paths["ft"], paths["target"], out, GraftOptions())
    with pytest.raises(GraftError) as err:
        run_checked_graft(request, checks, alphas=[0.5, 1.0],
                          settings=EngineSettings(**{"cache_dir": "", "probe_max_tokens": 300, **settings}))
    return built, err.value


def test_a_kl_sweep_no_prompt_fits_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """16-position models, the built-in prompts (46-76 tokens) and select kl_to_finetuned: both candidates were
    built and scored, then the sweep failed sweep_unscored ("every score was NaN or infinite"), the cause
    unsaid. It is refused before any candidate is built, saying no prompt fits and what to do instead."""
    from worker.engine.checks.checked_graft import Checks

    paths = _sweep_trio(tmp_path, max_positions=16)
    built, err = _sweep(paths, str(tmp_path / "out"), Checks(evaluate=EvaluateSpec(), select="kl_to_finetuned"),
                        monkeypatch)
    assert built == [] and err.code == "invalid_option", (built, err.code, err.message)
    assert "no prompt fits the models' context" in err.message and "16" in err.message
    assert "evaluate.prompts" in err.message and "select probe_loss" in err.message
    # The user's prompts past the context fail a sweep likewise before it builds, whatever it selects by.
    built, err = _sweep(paths, str(tmp_path / "out2"), Checks(evaluate=EvaluateSpec(prompts=["x" * 30]),
                                                              select="probe_loss"), monkeypatch)
    assert built == [] and err.code == "invalid_option" and "window of 16 tokens" in err.message
    assert not os.path.exists(str(tmp_path / "out")) and not os.path.exists(str(tmp_path / "out2"))


def test_a_kl_sweep_memory_leaves_no_prompt_fails_after_its_first_candidate(tmp_path, monkeypatch):
    """The context fits the prompts, the memory bound leaves a 40-token window (every built-in prompt skipped):
    the first candidate's evaluation shows it, and the sweep fails then, not after building every candidate."""
    from worker.engine.checks.checked_graft import Checks

    paths = _sweep_trio(tmp_path)
    m = _models(paths, t="target", f="ft")
    try:
        fixed = sum(parameter_bytes(x) + loading_module.module_overhead_bytes(x) for x in m.values())
        budget = fixed + activation_bytes(40, list(m.values()), at_once=2)
    finally:
        _close(m)
    built, err = _sweep(paths, str(tmp_path / "out"), Checks(evaluate=EvaluateSpec(), select="kl_to_finetuned"),
                        monkeypatch, eval_memory_bytes=budget)
    assert len(built) == 1 and err.code == "invalid_option", (built, err.code, err.message)
    assert "no prompt fits" in err.message and "GRAFT_EVAL_MEMORY_BYTES" in err.message
    assert "select probe_loss" in err.message


# --- review: unknown tokens and dropped characters ------------------------------------------------------

def _dropping_tokenizer() -> dict:
    """_letters_tokenizer without an unknown token: what its vocabulary lacks (a newline) is dropped."""
    from tokenizers import Tokenizer, models, processors

    alphabet = "abcdefghijklmnopqrstuvwxyz ."
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: 3 + i for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                      "eos_token": "</s>"}}


def _probe_counts(tmp_path, name: str, tokenizer: dict, text: str, max_tokens: int = 300) -> tuple[dict, int | None]:
    from worker.engine.checks.evaluation.probe import probe_counts, probe_encoding
    from worker.engine.checks.evaluation.text import open_tokenizer

    path = save(str(tmp_path / name), bigram_state(encode("abc"), seed=0), tokenizer=tokenizer)
    model = resolve(path, "source_finetuned")
    try:
        with open_tokenizer(model) as tok:
            ids, coverage = probe_encoding(tok, text, max_tokens)
            return probe_counts(ids, tok.unk_token_id, coverage), tok.unk_token_id
    finally:
        model.store.close()


def test_unknown_tokens_are_counted_when_the_pad_token_is_unk(tmp_path):
    """Many Llama 2 fine-tunes set `pad_token: <unk>`: the unknown id was taken for a pad id and not counted
    (share None, no warning). A pad never appears in an encoded text; the tokens an encoding inserts (BOS,
    EOS, CLS, SEP) still rule the unknown token out when it is one of them (GPT-2's is its end of text)."""
    from worker.engine.checks.evaluation.probe import probe_ids, unknown_share
    from worker.engine.checks.evaluation.text import open_tokenizer

    def counted(name: str, **extra) -> dict:
        letters = _letters_tokenizer()
        tok = {**letters, "tokenizer_config.json": {**letters["tokenizer_config.json"], **extra}}
        model = resolve(save(str(tmp_path / name), bigram_state(encode("abc"), seed=0), tokenizer=tok), "m")
        try:
            with open_tokenizer(model) as tokenizer:
                return unknown_share(probe_ids(tokenizer, LINES, 300), tokenizer.unk_token_id)
        finally:
            model.store.close()

    assert counted("pad", pad_token="<unk>")["unknown_tokens"] == LINES.count("\n")
    assert counted("mask", mask_token="<unk>")["unknown_tokens"] == LINES.count("\n")
    assert counted("eos", unk_token="</s>")["unknown_tokens"] is None


def test_characters_a_tokenizer_drops_are_reported_and_warned(tmp_path):
    """A BPE tokenizer without an unknown token drops the newlines it cannot spell: 8 characters gone, no
    unknown token to count, and no warning. What the ids do not spell is counted (characters_dropped,
    dropped_share) and warned past PROBE_UNKNOWN_SHARE, in the evaluation and at the function level."""
    dropping = _dropping_tokenizer()
    counts, unk = _probe_counts(tmp_path, "drop", dropping, LINES)
    newlines = LINES.count("\n")
    assert unk is None and counts["unknown_tokens"] is None
    assert (counts["characters"], counts["characters_dropped"]) == (len(LINES), newlines)
    assert counts["dropped_share"] == pytest.approx(newlines / len(LINES))
    assert counts["dropped_share"] > PROBE_UNKNOWN_SHARE
    # Cut to its first 30 tokens: what those cover, a newline dropped among them.
    cut, _ = _probe_counts(tmp_path, "cut", dropping, LINES, max_tokens=30)
    assert cut["characters_dropped"] == 1 and 29 <= cut["characters"] <= 31
    # A tokenizer that reads the text whole drops nothing; one that maps the newlines to <unk> counts both.
    assert _probe_counts(tmp_path, "bytes", tokenizer_files(), LINES)[0]["characters_dropped"] == 0
    assert _probe_counts(tmp_path, "unk", _letters_tokenizer(), LINES)[0]["characters_dropped"] == newlines
    assert _probe_counts(tmp_path, "clean", dropping, LINES.replace("\n", " "))[0]["characters_dropped"] == 0

    base = bigram_state(encode(LINES), seed=0)
    paths = {"base": save(str(tmp_path / "base"), base, tokenizer=dropping),
             "near": save(str(tmp_path / "near"), perturb(base, seed=1, scale=0.02), tokenizer=dropping)}
    result = _evaluate(paths, EvaluateSpec(probe_text=LINES, prompts=["the cat"], max_new_tokens=2),
                       output="near", target="base", finetuned="base")
    assert result["probe"]["characters_dropped"] == newlines and result["probe"]["unknown_share"] is None
    (warning,) = result["warnings"]
    assert warning["code"] == "probe_unknown_tokens" and f"{newlines} of the probe text's" in warning["message"]
    assert warning["thresholds"]["dropped_share"] == PROBE_UNKNOWN_SHARE
    m = _models(paths, source_base="base", target_base="near")
    try:
        probed = function_probe(m["source_base"], m["target_base"], m["source_base"], text=LINES,
                                settings=EngineSettings())
    finally:
        _close(m)
    assert probed["characters_dropped"] == newlines
    (r,) = function_reasons(probed)
    assert r["code"] == "probe_unknown_tokens" and r["verdict"] == "risky" and "not spelled" in r["message"]
    assert r["values"]["measured_code"] == "loss_barrier" and r["values"]["dropped_share"] > PROBE_UNKNOWN_SHARE


# --- review: the keys a model reads, and a sliding window is no context -----------------------------------

def test_context_keys_a_config_class_does_not_declare_are_not_read(tmp_path):
    """transformers keeps every key of config.json as an attribute: a Llama's `seq_length: 1` was refused
    invalid_input and `max_sequence_length: 8` gave 8-token windows, though a Llama reads neither. Only the
    keys the model type's config class declares count (GPT-2's n_positions, an MPT's max_seq_len)."""
    def context(**changes):
        return model_context(resolve(_with_config(tmp_path, f"c{len(os.listdir(tmp_path))}", **changes), "m"))

    assert context(seq_length=1) == 2048
    assert context(max_sequence_length=8, max_seq_len=4, n_positions=6, n_ctx=5, sliding_window=3,
                   attention_chunk_size=7) == 2048
    assert context(model_type="mpt", max_seq_len=24) == 24
    # GPT-2's n_ctx is no attribute it reads (its max_position_embeddings is n_positions, by attribute_map).
    path = _with_config(tmp_path, "gpt2", model_type="gpt2", n_positions=40, n_ctx=30)
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    del config["max_position_embeddings"]
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    assert model_context(resolve(path, "m")) == 40
    text = {"model_type": "llama", "max_position_embeddings": 40, "vocab_size": VOCAB, "seq_length": 1}
    assert context(model_type="llava", text_config=text) == 40


def test_a_prompt_past_the_sliding_window_is_not_refused(tmp_path):
    """A Mistral takes prompts past its sliding window (it bounds what a token attends to, not the positions):
    the user's 61-token prompt on a 48-token sliding window was refused invalid_option. The probe's windows
    stay within the span; a prompt is held to the context (max_position_embeddings) alone."""
    path = _with_config(tmp_path, "mistral", model_type="mistral", sliding_window=48)
    result = _evaluate({"m": path}, EvaluateSpec(prompts=["x" * 60], max_new_tokens=4), output="m", target="m",
                       finetuned="m", probe_max_tokens=200)
    assert result["probe"]["window"] == 48 and result["prompts"]["window"] == 200
    (sample,) = result["samples"]
    assert sample["max_new_tokens"] == 4 and result["kl_to_finetuned"]["tokens"] == 61
    # Past the context itself, still refused as the user's misconfiguration.
    small = _with_config(tmp_path, "small", model_type="mistral", sliding_window=16, max_position_embeddings=40)
    with pytest.raises(GraftError) as err:
        _evaluate({"m": small}, EvaluateSpec(prompts=["x" * 60], max_new_tokens=4), output="m", target="m",
                  finetuned="m")
    assert err.value.code == "invalid_option" and "window of 40 tokens" in err.value.message
