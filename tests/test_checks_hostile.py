"""Hostile inputs to the checks (evaluation, inspection, sweep, preflight): a tenant's chat template, tokenizer
files, config and generation config must give a clear error, never spin, crash or leak, and cancels and
killed workers must leave nothing half-done behind."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
from checks_models import PROBE, PROMPTS, checks_family
from eval_helpers import CHAT_TEMPLATE, bigram_state, encode, resolve, save, tokenizer_files, tokenizer_json

from worker.engine import GraftOptions, GraftRequest
from worker.engine.checks.checked_graft import Checks, run_checked_graft
from worker.engine.checks.evaluation import evaluate_graft, load_tokenizer
from worker.engine.checks.evaluation import text as text_module
from worker.engine.checks.evaluation.evaluate import render_prompts
from worker.engine.checks.evaluation.spec import EvaluateSpec
from worker.engine.checks.evaluation.text import open_tokenizer
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError, GraftSuperseded

SPEC = EvaluateSpec(probe_text=PROBE, prompts=PROMPTS, max_new_tokens=3)
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """See conftest.one_torch_thread."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return checks_family(str(tmp_path_factory.mktemp("hostile-checks")))


@pytest.fixture(scope="module")
def state():
    return bigram_state(encode(PROBE), seed=0)


def _children() -> list[int]:
    """Live tokenizer processes under this test process (other children, a session's S3 server, are not ours)."""
    return [pid for pid in _text_children(os.getpid()) if _state_of_pid(pid) not in ("gone", "Z")]


def _tokenizer_with(tmp_path, state, name: str, template: str, check=None):
    """The model's tokenizer in its bounded child process (close it, or use it in a `with`)."""
    path = save(str(tmp_path / name), state, tokenizer=tokenizer_files(chat_template=template))
    return open_tokenizer(resolve(path, "source_finetuned"), check=check)


# --- chat templates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("template,said", [
    (SPIN, "budget"),  # nested loops: hours of pure Python
    ("{{ 3 ** (10 ** 8) }}", "budget"),  # folded while compiling: one long C call
    ("{{ 'x' * 100000000 }}", "100,000,000 bytes"),  # within the memory limit, past the output cap
    ("{{ 'x' * (10 ** 11) }}", "memory"),  # one allocation past the memory limit
    ("{{ '{:>9000000000}'.format(1) }}", "memory"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for m in messages %}{{ m.content | unknown_filter }}{% endfor %}", "unknown_filter"),
])
def test_hostile_chat_template_is_stopped_with_a_clear_error(tmp_path, state, monkeypatch, template, said):
    # Those the budget stops run until it ends: a short one. The others must meet their own limit first, with room
    # for a loaded machine (the 100 MB string took over 4 s when two test processes shared two cores).
    monkeypatch.setattr(text_module, "TEMPLATE_SECONDS", 1.5 if said == "budget" else 10.0)
    t0 = time.monotonic()
    with _tokenizer_with(tmp_path, state, "ft", template) as tokenizer, pytest.raises(GraftError) as err:
        render_prompts(tokenizer, ["hello"])
    assert err.value.code == "chat_template_failed"
    assert said in err.value.message
    assert time.monotonic() - t0 < 20
    assert _children() == []


def test_chat_template_renders_as_transformers_does(tmp_path, state):
    """The bounded renderer gives apply_chat_template's own text (special tokens, generation prompt)."""
    prompts = ["hi", "é ünïcode {{ not a template }}"]
    with _tokenizer_with(tmp_path, state, "ft", CHAT_TEMPLATE) as tokenizer:
        rendered, chat = render_prompts(tokenizer, prompts)
    assert chat is True
    path = save(str(tmp_path / "same"), state, tokenizer=tokenizer_files(chat_template=CHAT_TEMPLATE))
    in_process = load_tokenizer(resolve(path, "source_finetuned"))
    assert rendered == [in_process.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False) for p in prompts]
    assert rendered[0] == "<s><|user|>hi\n<|assistant|>"
    assert _children() == []


def test_cancel_stops_the_template_at_once(tmp_path, state):
    # The cancel comes 2.5 s into the render: timed from the render's start, not the tokenizer's load (which
    # took longer than that on a busy machine, and the cancel then came before there was a template to stop).
    started = []

    def check():
        if started and time.monotonic() - started[0] > 2.5:
            raise GraftCancelled("the evaluation was cancelled")

    with _tokenizer_with(tmp_path, state, "ft", SPIN, check) as tokenizer, pytest.raises(GraftCancelled):
        started.append(time.monotonic())
        render_prompts(tokenizer, ["hello"])
    assert time.monotonic() - started[0] < 5
    assert _children() == []


def test_spinning_template_is_an_evaluation_error_and_the_graft_is_published(family, tmp_path, state,
                                                                             monkeypatch):
    monkeypatch.setattr(text_module, "TEMPLATE_SECONDS", 3.0)
    finetuned = save(str(tmp_path / "ft-spin"), _state_of(family["finetuned"]),
                     tokenizer=tokenizer_files(chat_template=SPIN))
    out = str(tmp_path / "out")
    warnings = []
    t0 = time.monotonic()
    result = run_checked_graft(GraftRequest.single(family["base"], finetuned, family["near"], out, GraftOptions()),
                               Checks(evaluate=SPEC), settings=_settings(tmp_path), warn=warnings.append)
    assert time.monotonic() - t0 < 30
    error = result.checks["evaluation"]["error"]
    assert error["code"] == "chat_template_failed" and "budget" in error["message"]
    assert [w["code"] for w in warnings] == ["evaluation_failed"]
    with open(os.path.join(out, "graft-manifest.json")) as fh:
        assert json.load(fh)["evaluation"]["error"]["code"] == "chat_template_failed"
    assert _children() == []


# --- tokenizers that spin or panic ---------------------------------------------------------------------

def _split_tokenizer(pattern: str) -> dict:
    """The test tokenizer with a Split pre-tokenizer on `pattern` first (tokenizers runs it with Oniguruma,
    a backtracking engine)."""
    doc = json.loads(tokenizer_json())
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        doc["pre_tokenizer"]]}
    files = tokenizer_files()
    files["tokenizer.json"] = json.dumps(doc)
    return files


def test_catastrophic_tokenizer_regex_is_stopped(tmp_path, state, monkeypatch):
    """Past Oniguruma's retry limit the tokenizers library panics (a BaseException, no Exception: it went
    through every `except Exception`); short of it, a probe text of runs that each cost a million steps keeps
    the encode (in Rust, the GIL released) going for minutes. Both are a tokenizer_failed, the child killed."""
    from worker.engine.checks.evaluation.probe import probe_ids

    monkeypatch.setattr(text_module, "ENCODE_SECONDS", 2.0)
    path = _model_dir(tmp_path, state, "panic", tokenizer=_split_tokenizer("(a+)+$"))
    with open_tokenizer(resolve(path, "source_finetuned")) as tokenizer, pytest.raises(GraftError) as err:
        probe_ids(tokenizer, "a" * 40 + "!", 100)
    assert err.value.code == "tokenizer_failed" and "retry-limit" in err.value.message
    path = _model_dir(tmp_path, state, "slow", tokenizer=_split_tokenizer("(a+)+b"))
    t0 = time.monotonic()
    with open_tokenizer(resolve(path, "source_finetuned")) as tokenizer, pytest.raises(GraftError) as err:
        probe_ids(tokenizer, ("a" * 20 + "!") * 400, 100)
    assert err.value.code == "tokenizer_failed" and "budget" in err.value.message
    assert time.monotonic() - t0 < 15  # a 2 s budget plus a child's start and kill; without it, minutes
    assert _children() == []
    # Through the evaluation: a GraftError, recorded by a checked graft as the evaluation's error.
    with pytest.raises(GraftError) as err:
        _evaluate_one(_model_dir(tmp_path, state, "eval", tokenizer=_split_tokenizer("(a+)+$")),
                      EvaluateSpec(probe_text="a" * 40 + "!", prompts=["hi"], max_new_tokens=2))
    assert err.value.code == "tokenizer_failed"


def test_tokenizer_memory_is_bounded(tmp_path, state, monkeypatch):
    """The tokenizer is built within the child's address-space limit: past it, no_tokenizer (or the child's
    end), never this process's memory."""
    monkeypatch.setattr(text_module, "TEXT_MEMORY_BYTES", 64 << 20)
    doc = json.loads(tokenizer_json())
    doc["model"]["vocab"].update({f"tok{i:07d}": 259 + i for i in range(300_000)})
    path = _model_dir(tmp_path, state, "big", tokenizer={**tokenizer_files(), "tokenizer.json": json.dumps(doc)})
    with pytest.raises(GraftError) as err:
        open_tokenizer(resolve(path, "source_finetuned"))
    assert err.value.code == "no_tokenizer" and "memory" in err.value.message
    assert _children() == []


# --- the fence and cancels inside the checks ---------------------------------------------------------------

@pytest.mark.parametrize("stop", [GraftCancelled, GraftSuperseded])
def test_fence_or_cancel_during_the_evaluation_publishes_nothing(family, tmp_path, stop):
    """A newer attempt taking the job over while this one evaluates (the fence, GraftSuperseded) is not an
    evaluation error to record beside a published graft: the output belongs to the newer attempt, and this
    one must stop at once without committing (it used to record the error and publish)."""
    out = str(tmp_path / "out")
    phases = []

    def should_cancel() -> bool:
        if phases and phases[-1] == "evaluating":
            raise stop()
        return False

    with pytest.raises(stop):
        run_checked_graft(GraftRequest.single(family["base"], family["finetuned"], family["near"], out, GraftOptions()),
                          Checks(evaluate=SPEC), settings=_settings(tmp_path), should_cancel=should_cancel,
                          progress=lambda p: phases.append(str(p.phase)))
    assert "evaluating" in phases and "committing" not in phases
    assert not os.path.exists(os.path.join(out, "graft-manifest.json"))
    assert _children() == []


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_process_or_thread_left_behind(tmp_path, state, monkeypatch):
    import gc
    import threading

    monkeypatch.setattr(text_module, "TEMPLATE_SECONDS", 2.0)
    paths = {name: _model_dir(tmp_path, state, name, tokenizer=files) for name, files in (
        ("good", tokenizer_files(chat_template=CHAT_TEMPLATE)), ("spin", tokenizer_files(chat_template=SPIN)),
        ("panic", _split_tokenizer("(a+)+$")), ("broken", {"tokenizer_config.json": {"tokenizer_class": "Trainer"}}))}
    _evaluate_one(paths["good"])  # imports and caches settle first
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    _evaluate_one(paths["good"])
    for name, code in (("spin", "chat_template_failed"), ("panic", "tokenizer_failed"), ("broken", "no_tokenizer")):
        with pytest.raises(GraftError) as err:
            _evaluate_one(paths[name], EvaluateSpec(probe_text="a" * 40 + "!", prompts=["hi"], max_new_tokens=2))
        assert err.value.code == code
    gc.collect()
    assert _fds() == fds
    assert threading.active_count() == threads
    assert _children() == []


def test_tokenizer_process_dies_with_its_parent(tmp_path, state):
    """A work horse killed (by its worker after a cancel's grace, by the OOM killer) mid-template: its
    tokenizer process goes with it rather than spinning on until its CPU limit."""
    import signal
    import subprocess
    import sys

    path = _model_dir(tmp_path, state, "spin", tokenizer=tokenizer_files(chat_template=SPIN))
    script = (f"import sys; sys.path[:0] = [{os.getcwd()!r}, {os.path.join(os.getcwd(), 'tests')!r}]\n"
              "from eval_helpers import resolve\n"
              "from worker.engine.checks.evaluation.text import open_tokenizer\n"
              f"with open_tokenizer(resolve({path!r}, 'source_finetuned')) as t:\n"
              "    t.render(['hi'])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 30
        while not _text_children(parent.pid):
            assert parent.poll() is None and time.time() < deadline, "no tokenizer process started"
            time.sleep(0.05)
        (child,) = _text_children(parent.pid)
        time.sleep(3.0)  # loaded (a second or so) and rendering by now
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 5
        while os.path.exists(f"/proc/{child}") and _state_of_pid(child) != "Z":
            assert time.time() < deadline, "the tokenizer process outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _state_of_pid(child) not in ("gone", "Z"):
            os.kill(child, signal.SIGKILL)  # this test's own orphan, should it have outlived its parent


def _state_of_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_prompt_longer_than_the_window_is_refused_before_any_forward_pass(tmp_path, state, monkeypatch):
    """A template may add tens of kilobytes to each prompt (within RENDERED_MAX_BYTES): every forward pass
    stays within the window the memory bound was computed for."""
    from worker.engine.checks.evaluation import loading

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", never)
    padded = "{{ bos_token }}" + "x" * 3000 + CHAT_TEMPLATE.removeprefix("{{ bos_token }}")
    path = _model_dir(tmp_path, state, "long", tokenizer=tokenizer_files(chat_template=padded))
    with pytest.raises(GraftError) as err:
        _evaluate_one(path)
    assert err.value.code == "invalid_option" and "prompts[0]" in err.value.message
    assert "chat template" in err.value.message and "window of 64 tokens" in err.value.message


def test_evaluation_of_an_overflowing_model_is_strict_json(tmp_path, state):
    """A loss past 709 nats overflows its perplexity (and a forward pass in float32 can give NaN): the record
    goes into the manifest and the job as strict JSON, such numbers as null, the warning still computed."""
    loud = {**state, "lm_head.weight": state["lm_head.weight"] * 1e6}
    result = _evaluate_one(_model_dir(tmp_path, loud, "loud"))
    json.dumps(result, allow_nan=False)
    assert result["probe"]["output"]["loss"] > 709 and result["probe"]["output"]["perplexity"] is None


# --- generation config ---------------------------------------------------------------------------------

def _model_dir(tmp_path, state, name: str, *, generation_config: dict | None = None, config: dict | None = None,
               tokenizer: dict | None = None) -> str:
    path = save(str(tmp_path / name), state, tokenizer=tokenizer or tokenizer_files(chat_template=CHAT_TEMPLATE),
                generation_config=generation_config)
    if config:
        with open(os.path.join(path, "config.json")) as fh:
            doc = json.load(fh)
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump({**doc, **config}, fh)
    return path


def _evaluate_one(path: str, spec: EvaluateSpec | None = None, **settings) -> dict:
    """The model evaluated against itself (output, target base and fine-tune alike)."""
    models = [resolve(path, role) for role in ("output", "target_base", "source_finetuned")]
    try:
        return evaluate_graft(*models, spec or EvaluateSpec(prompts=["hi"], max_new_tokens=4),
                              settings=EngineSettings(probe_max_tokens=64, **settings))
    finally:
        for m in models:
            m.store.close()


@pytest.mark.parametrize("generation_config,config", [
    ({"eos_token_id": "x"}, None),
    ({"eos_token_id": 10 ** 30}, None),
    ({"eos_token_id": [[1, 2], 3]}, None),
    ({"eos_token_id": {"a": 1}}, None),
    ({"eos_token_id": -5, "pad_token_id": 10 ** 12}, None),
    ({"bos_token_id": "x", "eos_token_id": list(range(5000))}, None),
    ({"eos_token_id": 2.5, "pad_token_id": True}, {"eos_token_id": 10 ** 9}),
    (None, {"eos_token_id": [3, 10 ** 9]}),
    ({"max_length": 10 ** 9, "min_new_tokens": 10 ** 6, "num_beams": 1000, "do_sample": True,
      "num_return_sequences": 50}, {"num_beams": 64, "min_length": 10 ** 5, "max_length": 3}),
])
def test_generation_settings_of_the_tenant_do_not_apply(tmp_path, state, generation_config, config):
    """Only valid token ids are taken from generation_config.json / config.json: other values (wrong types,
    ids past the vocabulary, huge lengths or beams) neither crash the evaluation nor change its decoding."""
    path = _model_dir(tmp_path, state, "m", generation_config=generation_config, config=config)
    result = _evaluate_one(path)
    assert [s["prompt"] for s in result["samples"]] == ["hi"]
    assert 0 < result["samples"][0]["tokens"] <= 4


SAMPLING = {"repetition_penalty": 1000.0, "no_repeat_ngram_size": 1, "suppress_tokens": list(range(200)),
            "begin_suppress_tokens": list(range(200)), "forced_bos_token_id": 5, "forced_eos_token_id": 2,
            "bad_words_ids": [[i] for i in range(3, 200)], "min_new_tokens": 8, "max_time": 0.0001,
            "exponential_decay_length_penalty": [1, 100.0], "do_sample": True, "temperature": 50.0}


@pytest.mark.parametrize("where", ["generation_config", "config"])
def test_sampling_settings_of_the_tenant_do_not_change_the_samples(tmp_path, state, where):
    """generate() fills what our greedy config leaves unset from the module's own generation config, which
    transformers builds from config.json: a tenant's penalties, suppressed or forced tokens changed the
    samples (config.json's did). The samples are plain greedy decoding whatever either file says."""
    plain = _evaluate_one(_model_dir(tmp_path, state, "plain"))["samples"]
    path = _model_dir(tmp_path, state, "hostile", **{where: SAMPLING})
    assert _evaluate_one(path)["samples"] == plain


def test_generation_stops_at_a_valid_end_of_sequence_id(tmp_path, state):
    from worker.engine.checks.evaluation.evaluate import greedy_config

    path = _model_dir(tmp_path, state, "m", generation_config={"eos_token_id": [2, 10 ** 9], "pad_token_id": 0},
                      config={"eos_token_id": 2, "bos_token_id": 1})
    config = greedy_config(resolve(path, "output"), 4)
    # A list holding an id past the vocabulary is not taken; config.json's valid id is.
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, 1)
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, 4)


# --- configs that build more than the checkpoint holds -----------------------------------------------------

@pytest.mark.parametrize("config,said", [
    ({"hidden_size": 10 ** 8}, "more parameters"),  # 10^16 values: one allocation would fail or take it all
    ({"intermediate_size": 10 ** 10}, "more parameters"),
    ({"vocab_size": 10 ** 9}, "more parameters"),
    ({"num_hidden_layers": 10 ** 5}, "tensors"),  # a module per layer: minutes and gigabytes of objects
    ({"model_type": "qwen2", "num_hidden_layers": 10 ** 9}, "tensors"),  # a per-layer list built in Python
    ({"hidden_act": "bogus"}, "KeyError"),
    ({"rope_scaling": {"rope_type": "bogus"}}, "bogus"),
    ({"pad_token_id": 10 ** 9}, "Padding_idx"),
    ({"num_hidden_layers": 1}, "1 tensor(s) its config.json has no place for".replace("1 t", "")),
    ({"hidden_size": 32, "head_dim": 8}, "config.json makes it"),
])
def test_config_that_builds_another_module_is_refused_before_allocating(tmp_path, state, config, said):
    from worker.engine.checks.evaluation import load_causal_lm

    path = _model_dir(tmp_path, state, "m", config=config)
    t0 = time.monotonic()
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(path, "output"))
    assert time.monotonic() - t0 < 10
    assert err.value.code in ("invalid_input", "model_too_large"), err.value.message
    assert said in err.value.message, err.value.message


def _gptj(tmp_path, positions: int) -> str:
    """A tiny GPT-J checkpoint (its position table is computed from the config at build time, eagerly)."""
    from safetensors.torch import save_file
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    module = GPTJForCausalLM(config)
    path = tmp_path / "gptj"
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path / "model.safetensors"))
    doc = {**config.to_dict(), "n_positions": positions}
    (path / "config.json").write_text(json.dumps(doc))
    return str(path)


def test_position_table_of_a_billion_positions_is_refused(tmp_path):
    from worker.engine.checks.evaluation import load_causal_lm

    small = load_causal_lm(resolve(_gptj(tmp_path / "a", 64), "output"))
    assert [tuple(b.shape) for n, b in small.named_buffers() if n.endswith("embed_positions")] == [(64, 8)]
    # 10^8 positions x 8 rotary dims in float32: 3.2 GB computed at build time, not one byte of it stored.
    t0 = time.monotonic()
    with pytest.raises(GraftError) as err:
        load_causal_lm(resolve(_gptj(tmp_path / "b", 10 ** 8), "output"))
    assert err.value.code in ("invalid_input", "model_too_large")
    assert "buffers" in err.value.message
    assert time.monotonic() - t0 < 10


def test_error_in_a_forward_pass_is_a_graft_error(tmp_path, state, monkeypatch):
    """A module transformers built but fails to run (here: a forward pass raising as an unsupported config
    value would) fails the evaluation with model_failed, naming the model, its memory freed."""
    from transformers import LlamaForCausalLM

    path = _model_dir(tmp_path, state, "m")

    def broken(self, *args, **kwargs):
        raise IndexError("index 300 is out of bounds for dimension 0 with size 260")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken)
    with pytest.raises(GraftError) as err:
        _evaluate_one(path)
    assert err.value.code == "model_failed" and "target_base" in err.value.message
    assert "IndexError" in err.value.message


# --- tokenizer files -----------------------------------------------------------------------------------

def _tokenizer_dir(tmp_path, state, name: str, files: dict, config: dict | None = None) -> str:
    return _model_dir(tmp_path, state, name, tokenizer=files, config=config)


def _no_tokenizer(path: str) -> str:
    """Refused by both loaders: in this process (load_tokenizer) and in the engine's bounded child."""
    with pytest.raises(GraftError) as err:
        load_tokenizer(resolve(path, "source_finetuned"))
    assert err.value.code == "no_tokenizer"
    with pytest.raises(GraftError) as child:
        open_tokenizer(resolve(path, "source_finetuned"))
    assert child.value.code == "no_tokenizer"
    assert _children() == []
    return err.value.message + " / " + child.value.message


def _ours(directory) -> list[str]:
    """What graft left in a temporary directory (torch keeps caches of its own there)."""
    return [name for name in os.listdir(directory) if name.startswith("graft-")]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Where tempfile puts temporary directories, for this test alone: what is left there is counted."""
    import tempfile

    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_tokenizer_class_that_is_not_a_tokenizer_is_refused_before_loading(tmp_path, state, private_tmp,
                                                                           monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    base = tokenizer_files()
    for i, cls in enumerate(("AutoModelForCausalLM", "AutoModelForCausalLMFast", "Trainer", "LlamaForCausalLM",
                             ["PreTrainedTokenizerFast"])):
        files = {**base, "tokenizer_config.json": {**base["tokenizer_config.json"], "tokenizer_class": cls}}
        message = _no_tokenizer(_tokenizer_dir(tmp_path, state, f"cls{i}", files))
        assert "tokenizer_class" in message
    # Named by config.json (read when tokenizer_config.json names no class): refused the same way.
    config = {k: v for k, v in base["tokenizer_config.json"].items() if k != "tokenizer_class"}
    message = _no_tokenizer(_tokenizer_dir(tmp_path, state, "cfgcls", {**base, "tokenizer_config.json": config},
                                           config={"tokenizer_class": "AutoModelForCausalLM"}))
    assert "tokenizer_class" in message
    assert _ours(private_tmp) == []


def test_auto_map_imports_no_code(tmp_path, state, private_tmp):
    """An auto_map naming the model's own module: trust_remote_code stays off and the module is never copied
    beside the tokenizer files, so nothing of it runs (it would leave a mark)."""
    mark = tmp_path / "ran"
    base = tokenizer_files()
    files = {**base, "tokenizer_config.json": {**base["tokenizer_config.json"],
                                               "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}}
    path = _tokenizer_dir(tmp_path, state, "automap", files,
                          config={"auto_map": {"AutoConfig": "evil.EvilConfig"}})
    with open(os.path.join(path, "evil.py"), "w") as fh:
        fh.write(f"open({str(mark)!r}, 'w').write('ran')\n")
    tokenizer = load_tokenizer(resolve(path, "source_finetuned"))
    assert type(tokenizer).__module__.startswith("transformers.")
    with open_tokenizer(resolve(path, "source_finetuned")) as child:
        assert child.encode(["ab"], special=True) == [encode("ab")]
    assert not mark.exists()
    assert _ours(private_tmp) == []


def test_oversized_and_malformed_tokenizer_files(tmp_path, state, private_tmp, monkeypatch):
    from worker.engine.checks.evaluation import loading

    base = tokenizer_files()
    deep = "[" * 100_000 + "]" * 100_000
    for i, files in enumerate(({**base, "tokenizer.json": deep}, {**base, "tokenizer_config.json": deep},
                               {**base, "tokenizer.json": "{\"model\": 7}"},
                               {**base, "tokenizer_config.json": "not json"},
                               {**base, "tokenizer_config.json": {"tokenizer_class": 7}})):
        _no_tokenizer(_tokenizer_dir(tmp_path, state, f"bad{i}", files))
    # Past the cap, all files together: refused before any is read.
    path = _tokenizer_dir(tmp_path, state, "big", base)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in base)
    monkeypatch.setattr(loading, "TOKENIZER_MAX_BYTES", size - 1)
    model = resolve(path, "source_finetuned")

    def no_reads(*args, **kwargs):
        raise AssertionError("a tokenizer file was read")

    monkeypatch.setattr(model.store, "read_range", no_reads)
    with pytest.raises(GraftError) as err:
        load_tokenizer(model)
    assert err.value.code == "no_tokenizer" and f"{size:,} bytes" in err.value.message
    assert _ours(private_tmp) == []


def test_hostile_config_is_no_business_of_the_tokenizer(tmp_path, state, private_tmp):
    """transformers builds a Qwen2 config's per-layer list in Python: a billion layers spin for minutes. The
    tokenizer is given only the model type."""
    path = _tokenizer_dir(tmp_path, state, "qwen", tokenizer_files(),
                          config={"model_type": "qwen2", "num_hidden_layers": 10 ** 9, "bos_token_id": [None]})
    t0 = time.monotonic()
    tokenizer = load_tokenizer(resolve(path, "source_finetuned"))
    assert time.monotonic() - t0 < 10
    assert tokenizer("ab")["input_ids"] == encode("ab")
    with open_tokenizer(resolve(path, "source_finetuned")) as child:
        assert child.encode(["ab"], special=True) == [encode("ab")]


# --- the headers level's tokenizer comparison -------------------------------------------------------------

def _set_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as fh:
        doc = json.load(fh)
    doc.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        doc.pop(key)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(doc, fh)


def _inspect_headers(paths: dict) -> dict:
    from worker.engine.checks.inspect import Level, inspect_graft

    request = GraftRequest.single(paths["source_base"], paths["source_finetuned"], paths["target_base"], "",
                           GraftOptions())
    return inspect_graft(request, level=Level.HEADERS).report


def test_vocab_size_of_a_config_is_not_a_loop_to_run(tmp_path):
    """The tokenizer comparison walked range(vocab_size): a config's 10^13 (or, without one, a token id of
    10^15 in tokenizer.json) spun the preview and the preflight job for as long as they were let run."""
    from test_inspect_headers import VOCAB, tokenizer_json, trio, words

    tok = {"tokenizer.json": tokenizer_json(words(VOCAB))}
    paths = trio(tmp_path / "a", tokenizers={r: tok for r in ("source_base", "source_finetuned", "target_base")})
    for path in paths.values():
        _set_config(path, vocab_size=10 ** 13)
    t0 = time.monotonic()
    report = _inspect_headers(paths)
    assert time.monotonic() - t0 < 10
    (entry,) = report["headers"]["tokenizer"]
    assert entry["status"] == "compared" and entry["reassigned"] == 0 and entry["rows_compared"] == 10 ** 13
    far = tokenizer_json(words(VOCAB))
    far["added_tokens"] = [{"id": 10 ** 15, "content": "<far>", "special": True}]
    paths = trio(tmp_path / "b", tokenizers={"source_base": {"tokenizer.json": far}, "target_base": tok})
    for path in paths.values():
        _set_config(path, vocab_size=None)
    t0 = time.monotonic()
    report = _inspect_headers(paths)
    assert time.monotonic() - t0 < 10
    assert report["headers"]["tokenizer"][0]["status"] == "compared"


def test_tokenizer_of_too_many_entries_is_not_compared(tmp_path, monkeypatch):
    from test_inspect_headers import VOCAB, tokenizer_json, trio, words

    from worker.engine.checks.inspect import tokens

    monkeypatch.setattr(tokens, "MAX_IDS", VOCAB - 1)
    tok = {"tokenizer.json": tokenizer_json(words(VOCAB))}
    vocab_json = {"vocab.json": {w: i for i, w in enumerate(words(VOCAB))}}
    paths = trio(tmp_path, tokenizers={"source_base": tok, "source_finetuned": tok, "target_base": vocab_json})
    report = _inspect_headers(paths)
    (entry,) = report["headers"]["tokenizer"]
    assert entry["status"] == "unknown" and "too large to compare" in entry["why"]
    assert report["verdict"] == "compatible"  # advice only: equal vocabulary sizes


def _state_of(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _settings(tmp_path, **changes) -> EngineSettings:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return EngineSettings(cache_dir="", scratch_dir=str(scratch), probe_max_tokens=256, **changes)




# --- through the service: cancels, a killed worker, preflight outputs -----------------------------------------

SLOW = {"GRAFT_BLOCK_BYTES": 4096, "GRAFT_JOB_BLOCK_DELAY": 0.03, "GRAFT_LEASE_SECONDS": 2,
        "GRAFT_MONITOR_INTERVAL": 0.3}


@pytest.fixture(scope="module")
def svc(redis_url, s3_endpoint, family, tmp_path_factory):
    from service_fixtures import Service

    root = str(tmp_path_factory.mktemp("svc-hostile"))
    os.makedirs(os.path.join(root, "scratch"))
    service = Service(redis_url, root, s3_endpoint=s3_endpoint,
                      GRAFT_ALLOWED_ROOTS=f"{root},{os.path.dirname(family['base'])}", GRAFT_PROBE_MAX_TOKENS="256",
                      GRAFT_SCRATCH_DIR=os.path.join(root, "scratch"), **SLOW)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


@pytest.fixture
def worker(svc):
    """One worker for this test alone: stopped (SIGTERM to its group) when the test ends."""
    import signal

    procs = []

    def start(**env):
        procs.append(svc.start_worker(**env))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:  # a warm shutdown finishes the job in hand: on a loaded machine that can pass 20 s
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _uris(family, target: str = "near", finetuned: str | None = None) -> dict:
    return {"source_base": f"file://{family['base']}", "source_finetuned": f"file://{finetuned or family['finetuned']}",
            "target_base": f"file://{family[target]}"}


def _wait_phase(c, job_id: str, phase: str, timeout: float = 60, written: bool = False) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = c.get(f"/v1/jobs/{job_id}").json()
        p = doc["progress"] or {}
        if doc["status"] == "running" and p.get("phase") == phase and (not written or p.get("bytes_written", 0) > 0):
            return doc
        assert doc["status"] in ("queued", "validating", "running"), doc
        time.sleep(0.05)
    raise AssertionError(f"job never reached {phase}: {doc}")


def _text_children(pid: int) -> list[int]:
    from service_fixtures import descendants_running

    return descendants_running(pid, b"_text_child.py")


def _ours_below(directory: str) -> list[str]:
    """Everything graft left below `directory` (its pending outputs, sweep scratch)."""
    out = []
    for base, dirs, files in os.walk(directory):
        out += [os.path.join(base, n) for n in dirs + files]
    return out


def test_cancel_during_the_evaluation_ends_the_job_and_its_tokenizer(svc, worker, family, tmp_path):
    """The evaluation spends its time in the fine-tune's chat template (a template that spins): a cancel
    through the API stops the job within seconds, kills the tokenizer's process, and publishes nothing."""
    spin = save(os.path.join(svc.root, "ft-spin"), _state_of(family["finetuned"]),
                tokenizer=tokenizer_files(chat_template=SPIN))
    proc = worker()
    out = os.path.join(svc.root, "outputs", "alpha", "evaluated")
    with svc.client() as c:
        job = c.post("/v1/jobs", json={**_uris(family, finetuned=spin), "output": f"file://{out}",
                                       "evaluate": {"prompts": PROMPTS, "max_new_tokens": 2}}).json()
        _wait_phase(c, job["id"], "evaluating")
        deadline = time.time() + 20
        while not _text_children(proc.pid):  # the template is rendering
            assert time.time() < deadline, "no tokenizer process under the worker"
            time.sleep(0.05)
        t0 = time.time()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        from service_fixtures import wait_job

        done = wait_job(c, job["id"], timeout=15)
    assert done["status"] == "cancelled" and time.time() - t0 < 5, done
    assert done["result"] is None
    assert not os.path.exists(out) or _ours_below(out) == []
    assert [n for n in os.listdir(os.path.dirname(out)) if n != "ft-spin"] == []
    time.sleep(0.3)
    assert _text_children(proc.pid) == []


def test_cancel_during_a_sweep_leaves_no_candidate(svc, worker, family):
    worker()
    out = os.path.join(svc.root, "outputs", "alpha", "swept-cancelled")
    with svc.client() as c:
        job = c.post("/v1/jobs", json={**_uris(family), "output": f"file://{out}", "options": {"alpha": [0.5, 1.0]},
                                       "evaluate": {"prompts": PROMPTS, "max_new_tokens": 2}}).json()
        _wait_phase(c, job["id"], "streaming", written=True)
        assert os.listdir(os.path.join(svc.root, "scratch")), "the candidate is built in the scratch directory"
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        from service_fixtures import wait_job

        done = wait_job(c, job["id"], timeout=15)
    assert done["status"] == "cancelled", done
    assert os.listdir(os.path.join(svc.root, "scratch")) == []
    assert not os.path.exists(out)
    assert [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".") or "swept" in n] == []


def test_worker_killed_mid_sweep_the_retry_publishes_one_output(svc, worker, family):
    from service_fixtures import wait_job

    first = worker()
    out = os.path.join(svc.root, "outputs", "alpha", "swept-killed")
    with svc.client() as c:
        job = c.post("/v1/jobs", json={**_uris(family), "output": f"file://{out}", "options": {"alpha": [0.5, 1.0]},
                                       "evaluate": {"prompts": PROMPTS, "max_new_tokens": 2}}).json()
        mid = _wait_phase(c, job["id"], "streaming", written=True)
        assert mid["attempt"] == 1
        svc.kill(first)
        assert os.listdir(os.path.join(svc.root, "scratch")), "the killed attempt's candidate is left"
        # The retry need not be slow (only the kill had to land mid-stream): it streams at full speed.
        worker(GRAFT_JOB_BLOCK_DELAY=0)
        done = wait_job(c, job["id"], timeout=120)
        types = [e["type"] for e in c.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert done["status"] == "succeeded", done.get("error")
    assert done["attempt"] == 2 and "worker_lost" in types
    with open(os.path.join(out, "graft-manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["sweep"]["chosen_alpha"] in (0.5, 1.0)
    listed = {f["path"] for f in manifest["output"]["files"]}
    assert set(os.listdir(out)) == listed | {"graft-manifest.json"}, "exactly the published graft's files"
    assert os.listdir(os.path.join(svc.root, "scratch")) == [], "the killed attempt's candidates are gone"
    assert [n for n in os.listdir(os.path.dirname(out)) if "swept-killed" in n] == ["swept-killed"]


def test_preflight_outputs_follow_the_graft_output_policy(svc, worker, family, s3_endpoint, s3_bucket):
    from service_fixtures import read_s3, wait_job

    from worker.engine.storage.s3 import s3_client

    worker()
    outputs = os.path.join(svc.root, "outputs", "alpha")
    occupied = os.path.join(outputs, "occupied")
    os.makedirs(occupied, exist_ok=True)
    with open(os.path.join(occupied, "mine.txt"), "w") as fh:
        fh.write("keep me")
    published = os.path.join(outputs, "published")
    os.makedirs(published, exist_ok=True)
    with open(os.path.join(published, "graft-manifest.json"), "w") as fh:
        fh.write("{}")
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="taken/x/other.bin", Body=b"theirs")
    body = {**_uris(family), "level": "weights"}
    with svc.client("alpha") as a, svc.client("beta") as b:
        inside = a.post("/v1/preflights", json={**body, "output": f"file://{published}/inside"})
        assert inside.status_code == 422 and inside.json()["errors"][0]["field"] == "output", inside.text
        theirs = b.post("/v1/preflights", json={**body, "output": f"file://{outputs}/beta-writes-here"})
        assert theirs.status_code == 422 and theirs.json()["errors"][0]["field"] == "output", theirs.text
        jobs = {name: a.post("/v1/preflights", json={**body, "output": uri}).json()["id"] for name, uri in (
            ("occupied", f"file://{occupied}"), ("s3_occupied", f"s3://{s3_bucket}/taken/x"),
            ("s3", f"s3://{s3_bucket}/preflights/one"))}
        done = {name: wait_job(a, job_id, timeout=120) for name, job_id in jobs.items()}
        phases = [e.get("phase") for e in a.get(f"/v1/jobs/{jobs['occupied']}/events").json()["data"]]
    for name in ("occupied", "s3_occupied"):
        assert done[name]["status"] == "failed" and done[name]["error"]["code"] == "output_exists", done[name]
    assert "inspecting" not in phases, "refused before the inspection's pass, not after it"
    with open(os.path.join(occupied, "mine.txt")) as fh:
        assert fh.read() == "keep me"
    assert os.listdir(occupied) == ["mine.txt"]
    assert client.get_object(Bucket=s3_bucket, Key="taken/x/other.bin")["Body"].read() == b"theirs"
    assert done["s3"]["status"] == "succeeded", done["s3"].get("error")
    got = read_s3(s3_endpoint, f"s3://{s3_bucket}/preflights/one")
    assert set(got) == {"report.json", "layers.png", "graft-manifest.json"}
    manifest = json.loads(got["graft-manifest.json"])
    assert {f["path"] for f in manifest["files"]} == {"report.json", "layers.png"}
    assert json.loads(got["report.json"])["verdict"] == manifest["verdict"] == done["s3"]["result"]["report"]["verdict"]
    assert got["layers.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert done["s3"]["result"]["chart_uri"] == f"s3://{s3_bucket}/preflights/one/layers.png"


@pytest.mark.parametrize("path,patch", [
    ("/v1/jobs", '"evaluate": {"prompts": ["a\\ud800b"]}'),
    ("/v1/jobs", '"evaluate": {"probe_text": "x\\udfff"}'),
    ("/v1/preflights", '"level": "function", "probe_text": "x\\ud800"'),
])
def test_lone_surrogates_in_checks_are_a_4xx(svc, family, path, patch):
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 text holds: refused with a problem, not a 500,
    and never handed to a tokenizer."""
    raw = json.dumps(_uris(family))[:-1] + ", " + patch + "}"
    with svc.client() as c:
        r = c.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
