"""Running a model of a graft: the module built by transformers from the model's config.json and filled with
the tensors read through the model's Store (so local, s3:// and hf:// inputs all work, and the tenant's
confinement, applied when the model was resolved, holds for every byte read), its tokenizer from its own
files, and the bounds that keep a probe or an evaluation within the worker's memory and time."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from worker.engine.checks.evaluation.limits import MIN_WINDOW, ForwardShape, forward_shape, logits_bytes, pass_bytes
from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.storage.model import ResolvedModel
from worker.engine.storage.safetensors_format import DTYPES, TensorInfo

# Of the memory the OS says is available, the share a probe or an evaluation may plan on: the rest is the
# worker's own (the interpreter, transformers, the tokenizer, read buffers) and the page cache's.
AVAILABLE_SHARE = 0.8
READ_CHUNK = 16 << 20  # bytes read per ranged read while filling a module (one reused buffer)
# A model's tokenizer files read at most, all told: the largest in use (Gemma 3's: a 33 MB tokenizer.json, a
# 4.7 MB tokenizer.model) with room to spare; building one costs some 30 times its size in memory.
TOKENIZER_MAX_BYTES = 64 << 20
# What a module built from a config may hold beyond its checkpoint: parameters registered past the tensors'
# count (a tied head is built untied first, then tied) and values past theirs (that head again); and buffers
# transformers computes from the config (rotary frequencies: kilobytes; GPT-J's position table, CodeGen's
# causal mask: megabytes at the usual context lengths).
EXTRA_SLOTS = 64
EXTRA_NUMEL = 1 << 20
BUFFER_MAX_BYTES = 256 << 20
MODULE_BYTES_PER_TENSOR = 8 << 10  # a module's Python objects per parameter (about 6 KB measured), rounded up
# Config entries that count layers: bounded by the checkpoint before transformers reads the config.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers",
                    "num_encoder_layers")
# What transformers raises running a module it built (ours are GraftErrors and pass through).
RUN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, ArithmeticError,
              MemoryError, AssertionError)
# Old checkpoints carry the rotary frequencies per layer; transformers computes them from the config and
# ignores these, and so do we.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class Deadline:
    """The wall-clock budget of a probe or an evaluation and its cancellation, checked between forward
    passes (and between tensors while loading): `check()` raises past either."""

    def __init__(self, seconds: float, should_cancel: Callable[[], bool] | None = None, *,
                 what: str = "evaluation") -> None:
        self.seconds = seconds
        self.should_cancel = should_cancel
        self.what = what
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise GraftCancelled(f"the {self.what} was cancelled")
        if self.elapsed > self.seconds:
            raise GraftError("eval_timeout", f"the {self.what} ran past its budget of {self.seconds:g} s "
                             f"(GRAFT_EVAL_SECONDS) after {self.elapsed:.1f} s")


# --- memory ---------------------------------------------------------------------------------------------

def parameter_bytes(model: ResolvedModel, dtype: torch.dtype = torch.float32) -> int:
    """What the model's parameters take once loaded in `dtype` (a tied head is stored once, as in the file)."""
    return sum(info.numel for info in model.tensors.values()) * dtype.itemsize


def _host_available() -> int | None:
    """MemAvailable from /proc/meminfo, lowered to what the cgroup (a container's limit) still allows."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                found.append(max(0, int(limit) - int(fh.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def available_bytes(device: str = "cpu") -> int | None:
    """Free memory where the models will live: the GPU's for a CUDA device, the host's otherwise."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return _host_available()


def module_overhead_bytes(model: ResolvedModel) -> int:
    """Host memory of the Python objects of a module built for the model (modules, parameters), apart from
    their data: a checkpoint of a million tiny tensors costs gigabytes that its bytes do not show."""
    return len(model.tensors) * MODULE_BYTES_PER_TENSOR


def memory_limit(settings: EngineSettings, device: str = "cpu") -> tuple[int, str]:
    """(bytes the models and their activations may take, what sets it): GRAFT_EVAL_MEMORY_BYTES, lowered to
    80% of the available memory (the GPU's free memory for a CUDA device)."""
    limit, source = settings.eval_memory_bytes, "GRAFT_EVAL_MEMORY_BYTES"
    free = available_bytes(device)
    if free is not None and AVAILABLE_SHARE * free < limit:
        limit, source = int(AVAILABLE_SHARE * free), f"{AVAILABLE_SHARE:.0%} of the {free:,} bytes available"
    return limit, source


def check_fits(models: Sequence[ResolvedModel], settings: EngineSettings, *, device: str = "cpu",
               extra_bytes: int = 0, what: str = "evaluation") -> int:
    """Refuse, before anything is loaded, when `models` held at once in float32, plus `extra_bytes` of
    activations, exceed settings.eval_memory_bytes or 80% of the available memory (the GPU's free memory
    for a CUDA device). Returns the bytes needed. What the modules transformers builds from the configs
    take beyond this is refused when each is built (load_causal_lm)."""
    params = sum(parameter_bytes(m) for m in models)
    overhead = sum(module_overhead_bytes(m) for m in models)
    needed = params + overhead + extra_bytes
    limit, source = memory_limit(settings, device)
    if needed > limit:
        names = ", ".join(f"{m.role} ({parameter_bytes(m):,} bytes)" for m in models)
        raise GraftError("model_too_large", f"the {what} needs {needed:,} bytes ({params:,} of float32 parameters: "
                         f"{names}; {extra_bytes:,} of activations; {overhead:,} for the modules' objects) and may "
                         f"take {limit:,} ({source})", {"needed_bytes": needed, "limit_bytes": limit})
    return needed


@dataclass(frozen=True)
class Phase:
    """Models held at once while forward passes run through them one at a time; `at_once`: how many of
    their logits are held together; `extra_bytes`: what else the phase holds (a tied head built untied)."""

    models: Sequence[ResolvedModel]
    at_once: int = 1
    extra_bytes: int = 0


def fit_window(phases: Sequence[Phase], settings: EngineSettings, *, device: str = "cpu", upper: int,
               what: str = "evaluation") -> int:
    """The longest window, at most `upper` tokens, whose forward passes fit the memory bound in every phase
    (the activations of limits.py's model, beside the models' parameters): a config whose attention would
    outgrow the bound (thousands of heads of one dimension) is probed on shorter windows. Below
    min(MIN_WINDOW, upper) tokens the memory does not allow, GraftError("model_too_large"), before anything
    is loaded."""
    limit, _ = memory_limit(settings, device)
    plans = [(p, [forward_shape(m) for m in p.models],
              sum(parameter_bytes(m) + module_overhead_bytes(m) for m in p.models) + p.extra_bytes) for p in phases]

    def activations(phase: Phase, shapes: list[ForwardShape], tokens: int) -> int:
        return (max(pass_bytes(s, tokens) for s in shapes)
                + phase.at_once * max(logits_bytes(s, tokens) for s in shapes))

    def fits(tokens: int) -> bool:
        return all(fixed + activations(p, shapes, tokens) <= limit for p, shapes, fixed in plans)

    low, high = min(MIN_WINDOW, upper), upper
    if fits(high):
        low = high
    elif fits(low):
        while high - low > 1:  # fits(low), not fits(high)
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    for phase, shapes, _ in plans:  # the refusal, with its figures, when not even `low` fits
        check_fits(phase.models, settings, device=device, what=what,
                   extra_bytes=activations(phase, shapes, low) + phase.extra_bytes)
    return low


# --- modules --------------------------------------------------------------------------------------------

def build_config(model: ResolvedModel, *, untie: bool = False):
    """The transformers config of the model's config.json (`untie`: lm_head as a tensor of its own)."""
    from transformers import CONFIG_MAPPING

    raw = dict(model.config)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise GraftError("invalid_input", f"{model.role}: model_type {model_type!r} is not one this worker's "
                         "transformers can run")
    _check_layer_counts(model, raw)
    subs = {k: dict(v) for k, v in raw.items() if k.endswith("_config") and isinstance(v, dict)}  # text_config, ...
    raw.update(subs)  # copies: the model's own config stays as it was read
    for config in (raw, *subs.values()):
        _run_settings_ours(config)
    if untie:
        raw["tie_word_embeddings"] = False
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:
        raise GraftError("invalid_input", f"{model.role}: transformers refuses its config.json: {exc}") from None


# How the module runs is ours to say, not the config's: transformers would take an attention or experts
# implementation named there (a kernel from the hub, flex attention compiling), keep every layer's attention
# probabilities or hidden states (L x heads x T^2 past the memory bound), or answer tuples without `.logits`.
RUN_SETTINGS = {"output_attentions": False, "output_hidden_states": False, "return_dict": True}
IMPLEMENTATION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                       "experts_implementation", "_experts_implementation", "_experts_implementation_internal")


def _run_settings_ours(config: dict) -> None:
    for key in IMPLEMENTATION_KEYS:
        config.pop(key, None)
    config.update(RUN_SETTINGS)


def _no_init():
    """Skip the random init of weights we overwrite anyway (seconds to minutes on big models)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def _check_layer_counts(model: ResolvedModel, raw: dict) -> None:
    """A layer count past the checkpoint's tensor count (every layer has one at least) is refused before
    transformers sees it: some configs build per-layer lists in Python (a billion layers: minutes and
    gigabytes before any module exists)."""
    limit = len(model.tensors)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    for config in (raw, text):
        for key in LAYER_COUNT_KEYS:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise GraftError("invalid_input", f"{model.role}: its config.json says {key} = {value:,}; its "
                                 f"checkpoint holds {limit:,} tensors")


class _Overbuilt(Exception):
    """Raised inside transformers' module construction: the module outgrows the checkpoint."""


@contextmanager
def _bounded_construction(model: ResolvedModel) -> Iterator[None]:
    """While a module is built: stop it as soon as its parameters outnumber or outweigh the checkpoint's
    tensors (with room for a tied head built untied first and a few extras), or its buffers outweigh
    BUFFER_MAX_BYTES past what the checkpoint stores. A config can make transformers build far more than the
    checkpoint holds (a million experts, a billion positions); nothing of that is built."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    numels = [info.numel for info in model.tensors.values()]
    limit_count = len(numels) + EXTRA_SLOTS
    limit_numel = sum(numels) + max(numels, default=0) + EXTRA_NUMEL
    limit_buffers = parameter_bytes(model) + BUFFER_MAX_BYTES
    seen = {"count": 0, "numel": 0, "buffers": 0}

    def on_parameter(module, name, param):
        if param is not None:
            seen["count"] += 1
            seen["numel"] += param.numel()
            if seen["count"] > limit_count or seen["numel"] > limit_numel:
                raise _Overbuilt(f"its config.json makes a module with more parameters than its checkpoint's "
                                 f"{len(numels):,} tensors ({sum(numels):,} values) hold")
        return None

    def on_buffer(module, name, buffer):
        if buffer is not None:
            seen["buffers"] += buffer.numel() * buffer.element_size()
            if seen["buffers"] > limit_buffers:
                raise _Overbuilt(f"its config.json makes transformers compute more than {limit_buffers:,} bytes "
                                 "of buffers (position tables, masks) beside the weights")
        return None

    handles = [register_module_parameter_registration_hook(on_parameter),
               register_module_buffer_registration_hook(on_buffer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _build(model: ResolvedModel, config, device, dtype: torch.dtype):
    """transformers' causal LM for `config` on `device` (weights left uninitialized), within
    _bounded_construction; whatever transformers raises on the config is GraftError("invalid_input")."""
    from transformers import AutoModelForCausalLM

    try:
        with _no_init(), torch.device(device), _bounded_construction(model):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except _Overbuilt as exc:
        raise GraftError("invalid_input", f"{model.role}: {exc}") from None
    except ValueError as exc:  # no causal-LM class for this config
        raise GraftError("invalid_input", f"{model.role}: transformers has no causal LM for it: {exc}") from None
    except Exception as exc:  # an activation it does not know (KeyError), a padding id past the vocabulary, ...
        said = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise GraftError("invalid_input", f"{model.role}: transformers cannot build it from its config.json: "
                         f"{type(exc).__name__}: {said}") from None
    module.tie_weights()  # post_init ties inside the init we skipped
    return module


def measure_module(model: ResolvedModel, *, untie: bool = False, dtype: torch.dtype = torch.float32) -> int:
    """Build the model's module on the meta device (no memory) and match it to the checkpoint: every slot
    the checkpoint fills must have its tensor's shape, and the buffers transformers computes from the config
    must stay within BUFFER_MAX_BYTES. Refuses before anything is allocated; returns the bytes the module
    will take."""
    config = build_config(model, untie=untie)
    meta = _build(model, config, "meta", dtype)
    _assign(meta, model)  # missing, unexpected and misshapen tensors refused here, on shapes alone
    transient = transient_buffers(meta)
    computed = sum(b.numel() * b.element_size() for n, b in meta.named_buffers() if n in transient)
    if computed > BUFFER_MAX_BYTES:
        raise GraftError("model_too_large", f"{model.role}: its config.json makes transformers compute "
                         f"{computed:,} bytes of buffers (position tables, masks) beside the weights; at most "
                         f"{BUFFER_MAX_BYTES:,} are allowed")
    seen: set[int] = set()
    total = 0
    for tensor in [*meta.parameters(), *meta.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def load_causal_lm(model: ResolvedModel, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   untie: bool = False, check: Callable[[], None] | None = None):
    """The model as a transformers causal LM on `device` in `dtype`, in eval mode, every parameter and
    persistent buffer read through the model's store. A missing or unexpected tensor, or one whose shape
    the config does not make, is GraftError("invalid_input"), found on a meta-device build before any
    memory is taken (measure_module). `check` is called between tensors."""
    measure_module(model, untie=untie, dtype=dtype)
    module = _build(model, build_config(model, untie=untie), device, dtype)
    try:
        fill_module(module, model, check=check)
    except BaseException:
        release(module)
        raise
    return module.eval()


def transient_buffers(module) -> set[str]:
    """Names of the non-persistent buffers (rotary frequencies and the like): computed from the config when
    the module is built, never in a checkpoint."""
    return {f"{prefix}.{name}" if prefix else name for prefix, sub in module.named_modules(remove_duplicate=False)
            for name in getattr(sub, "_non_persistent_buffers_set", ())}


def _slots(module) -> list[tuple[list[str], torch.Tensor]]:
    """Each tensor the checkpoint supplies, once, with every name it goes by (a tied head shares the
    embedding's); non-persistent buffers are computed from the config, not read."""
    transient = transient_buffers(module)
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        if name not in transient:
            groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def _head_alias(module) -> tuple[str | None, str | None]:
    """(lm_head name, embedding name): a checkpoint without the head reads it as the embedding (as the
    planner does), tied in the config or not."""
    where = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}

    def weight_name(getter) -> str | None:
        try:
            found = getter()
        except (AttributeError, NotImplementedError):
            return None
        return f"{where[id(found)]}.weight" if found is not None and id(found) in where else None

    return weight_name(module.get_output_embeddings), weight_name(module.get_input_embeddings)


def _assign(module, model: ResolvedModel) -> list[tuple[list[TensorInfo], torch.Tensor]]:
    """Which checkpoint tensor(s) fill each slot; missing and unexpected tensors refused together."""
    head, embed = _head_alias(module)
    out, missing, used = [], [], set()
    for names, tensor in _slots(module):
        present = [model.tensors[n] for n in names if n in model.tensors]
        if not present and head in names and embed in model.tensors:
            present = [model.tensors[embed]]
        if not present:
            missing.append(names[0])
            continue
        for info in present:
            used.add(info.name)
            if info.shape != tuple(tensor.shape):
                raise GraftError("invalid_input", f"{model.role}: tensor {info.name!r} is {list(info.shape)} in "
                                 f"the checkpoint; its config.json makes it {list(tensor.shape)}")
        out.append((present, tensor))
    extra = [n for n in model.tensors if n not in used and not _IGNORED.search(n)]
    if missing or extra:
        said = [f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}"] if missing else []
        said += [f"{len(extra)} tensor(s) its config.json has no place for: {', '.join(extra[:5])}"] if extra else []
        raise GraftError("invalid_input", f"{model.role}: the checkpoint does not match its config.json: "
                         + "; ".join(said))
    return out


def fill_module(module, model: ResolvedModel, *, check: Callable[[], None] | None = None) -> None:
    """Copy every checkpoint tensor into its slot, converting dtype, in file order, through one reused
    buffer (host memory: READ_CHUNK past the module)."""
    plan = _assign(module, model)
    plan.sort(key=lambda item: (item[0][0].file, item[0][0].start))
    reads = [(info.file, info.start, info.nbytes) for infos, _ in plan for info in infos]
    model.store.expect(reads)
    buf = bytearray(READ_CHUNK)
    with torch.no_grad():
        for infos, tensor in plan:
            _copy_into(model, infos[0], tensor, buf)
            for other in infos[1:]:  # a tied pair stored twice: the copies must agree
                twin = torch.empty_like(tensor)
                _copy_into(model, other, twin, buf)
                if not torch.equal(twin, tensor):
                    raise GraftError("invalid_input", f"{model.role}: its config ties {infos[0].name!r} and "
                                     f"{other.name!r}, but the checkpoint stores them with different values")
            if check is not None:
                check()


def _copy_into(model: ResolvedModel, info: TensorInfo, tensor: torch.Tensor, buf: bytearray) -> None:
    dtype = DTYPES[info.dtype]
    flat = tensor.view(-1)
    per = len(buf) // dtype.itemsize
    for first in range(0, info.numel, per):
        n = min(per, info.numel - first)
        view = memoryview(buf)[:n * dtype.itemsize]
        model.store.stream_into(info.file, info.start + first * dtype.itemsize, view)
        flat[first:first + n].copy_(torch.frombuffer(view, dtype=dtype, count=n))


def release(module) -> None:
    """Free a module's memory now, even while someone still holds a reference to it."""
    module.to("meta")  # every parameter and buffer replaced: their storage goes with the last reference
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _said(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation refused (the host's, the GPU's): past what the memory model foresaw."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def run_failure(model: ResolvedModel, exc: BaseException, *, where: str) -> GraftError:
    """What transformers raised running the module of `model`, as a GraftError naming that model:
    model_too_large for memory refused, model_failed for the rest."""
    if _out_of_memory(exc):
        return GraftError("model_too_large", f"{model.role}: {where} ran out of memory: {type(exc).__name__}: "
                          f"{_said(exc)}")
    return GraftError("model_failed", f"running the models failed in {model.role}'s {where}: "
                      f"{type(exc).__name__}: {_said(exc)}")


@contextmanager
def running(model: ResolvedModel, where: str = "forward pass") -> Iterator[None]:
    """Around the forward passes of one model: whatever transformers raises in them (a config value it
    accepted at build time and fails on when run, memory running out) is a GraftError naming this model,
    whichever others are loaded beside it."""
    try:
        yield
    except GraftError:
        raise
    except RUN_ERRORS as exc:
        raise run_failure(model, exc, where=where) from None


@contextmanager
def loaded(model: ResolvedModel, *, device: str = "cpu", untie: bool = False,
           check: Callable[[], None] | None = None) -> Iterator:
    """load_causal_lm for the length of a `with`, its memory freed on the way out, whatever happens. What
    transformers raises in the `with` and no `running` claimed is a GraftError naming this model too."""
    module = load_causal_lm(model, device=device, untie=untie, check=check)
    try:
        yield module
    except GraftError:
        raise
    except RUN_ERRORS as exc:
        raise run_failure(model, exc, where="run") from None
    finally:
        release(module)


# --- tokenizers -----------------------------------------------------------------------------------------

def write_tokenizer_dir(model: ResolvedModel, directory: str) -> list[str]:
    """Write the model's tokenizer files into `directory` for transformers to load (in text.py's child
    process, or here: load_tokenizer); returns their names. GraftError("no_tokenizer") without usable ones.

    The files are the tenant's: TOKENIZER_MAX_BYTES of them at most, all told, checked before any is read (a
    tokenizer costs some 30 times its files' size in memory while it is built); no code of theirs runs
    (trust_remote_code stays off and only tokenizer files are copied, so an `auto_map` has nothing to
    import); of config.json only what picks the tokenizer is passed on (a hostile config, a model of a
    billion layers say, is no business of its tokenizer). Whoever loads it first refuses a `tokenizer_class`
    that is not a tokenizer class (_text_child.check_tokenizer_class)."""
    names = model.tokenizer_files()
    if not names:
        raise GraftError("no_tokenizer", f"{model.role}: {model.uri} has no tokenizer files (tokenizer.json, "
                         "tokenizer.model, vocab.json, ...); the models cannot be run on text without them")
    sizes = {name: model.store.size(name) for name in names}
    if sum(sizes.values()) > TOKENIZER_MAX_BYTES:
        raise GraftError("no_tokenizer", f"{model.role}: its tokenizer files ({', '.join(names)}) hold "
                         f"{sum(sizes.values()):,} bytes; at most {TOKENIZER_MAX_BYTES:,} are read")
    picks = {k: model.config[k] for k in ("model_type", "tokenizer_class") if isinstance(model.config.get(k), str)}
    for name in names:
        data = model.side_file(name)
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(data)
        del data
    # AutoTokenizer reads the model type from config.json when tokenizer_config.json names no class.
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(picks, fh)
    return names


def load_tokenizer(model: ResolvedModel):
    """The model's tokenizer in this process (write_tokenizer_dir's checks, a private temporary directory
    removed before this returns, whatever happens). For the tenant's models the engine uses
    text.open_tokenizer instead: the same files in a child process, within time and memory bounds."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    from worker.engine.checks.evaluation._text_child import Refusal, check_tokenizer_class

    with tempfile.TemporaryDirectory(prefix="graft-tokenizer-") as tmp:
        names = write_tokenizer_dir(model, tmp)
        try:
            check_tokenizer_class(tmp)
        except Refusal as exc:
            raise GraftError(exc.code, f"{model.role}: {exc.message}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            said = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise GraftError("no_tokenizer", f"{model.role}: its tokenizer files ({', '.join(names)}) do not "
                             f"make a tokenizer: {said}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise GraftError("no_tokenizer", f"{model.role}: its tokenizer files make a {type(tokenizer).__name__}, "
                         "not a tokenizer")
    return tokenizer
