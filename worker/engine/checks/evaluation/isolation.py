"""The models' forward passes (an evaluation, a function-level probe) in a child process of their own.

The memory check (loading.check_fits) counts what transformers' modules and their activations take for the
architectures it knows; a config it does not foresee (an expert layout run densely, an attention kernel that
materializes more) could still allocate past it, and in the worker's own process that takes the worker down
with every job it holds. So, with GRAFT_EVAL_ISOLATION=process (the default), the work runs in a fresh
interpreter (`_model_child.py`) that re-resolves the same inputs under the same confinement, under an
address-space limit of its imports plus the budget plus MEMORY_SLACK_BYTES on CPU (CUDA reserves address space
it never uses, so there only the count holds), dies with its parent, and is killed at a cancel or past its
wall-clock budget. What fails in it comes back as a GraftError: its own, model_too_large where an allocation
passed the limit, model_failed where the process died. `inline` runs in this process (tests that patch the
loaders, a debugger).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from worker.engine.config import EngineSettings
from worker.engine.errors import GraftCancelled, GraftError
from worker.engine.storage import schemes
from worker.engine.storage.model import ResolvedModel

MEMORY_SLACK_BYTES = 2 << 30  # the interpreter's own allocations, the allocator's fragmentation, the tokenizer's pipe
START_SECONDS = 120.0  # importing torch and transformers and resolving the inputs, beyond the work's own budget
POLL_SECONDS = 0.1
ANSWER_MAX_BYTES = 64 << 20


def isolated(settings: EngineSettings) -> bool:
    return settings.eval_isolation == "process"


def run_in_child(op: str, models: dict[str, ResolvedModel], args: dict, *, settings: EngineSettings, device: str,
                 allowed_roots: list[str] | None, denied_roots: list[str] | None,
                 should_cancel: Callable[[], bool] | None) -> dict:
    """`op` ("evaluate" or "probe", see _model_child.OPS) on `models` (a name of op's -> a model, resolved again
    in the child by its pinned location under its own role), its answer as the in-process call would return
    it."""
    request = {"op": op, "args": args, "device": device,
               "settings": settings.model_dump(mode="json", include=set(EngineSettings.model_fields)),
               "models": {name: {"role": m.role, "uri": pinned_uri(m)} for name, m in models.items()},
               "allowed_roots": allowed_roots, "denied_roots": denied_roots,
               "memory": settings.eval_memory_bytes + MEMORY_SLACK_BYTES if device == "cpu" else None}
    deadline = time.monotonic() + settings.eval_seconds + START_SECONDS
    # The request goes as a file (a probe text's escapes can pass a pipe's buffer, and a write into a pipe
    # the child has not begun to read would block beyond any cancel); the file is the child's alone.
    with tempfile.TemporaryDirectory(prefix="graft-models-") as tmp:
        path = os.path.join(tmp, "request.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(request, fh)
        proc = _start(path)
        try:
            answer = _answer(proc, deadline, should_cancel)
        finally:
            _stop(proc)
    if "error" in answer:
        error = answer["error"] if isinstance(answer["error"], dict) else {}
        raise GraftError(str(error.get("code") or "model_failed"), str(error.get("message") or "the models' "
                         "process failed"), error.get("details") if isinstance(error.get("details"), dict) else None)
    if not isinstance(answer.get("result"), dict):
        raise GraftError("model_failed", "the models' process answered nonsense")
    return answer["result"]


def pinned_uri(model: ResolvedModel) -> str:
    """The model's location as the child must read it: a hub repository at the commit this process resolved
    (a revision such as `main` may have moved since), anything else as it is."""
    location = model.store.location
    return str(schemes.get(location.scheme).pinned(location, getattr(model.store, "revision", None)))


def _start(request_path: str) -> subprocess.Popen:
    # glibc gives each of torch's threads a malloc arena of 64 MiB of address space: on a many-core host they
    # alone would pass the slack. A few arenas cost nothing measurable for tensors this size.
    # The service's own settings (API keys, the webhook secret, Redis) are not the child's: it takes the engine
    # settings from its request. Storage credentials, HF_* and CUDA_* stay.
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRAFT_")}
    env["MALLOC_ARENA_MAX"] = "4"
    try:  # stderr is discarded: the answer says what went wrong, and nothing of it may pile up
        return subprocess.Popen([sys.executable, "-m", "worker.engine.checks.evaluation._model_child", str(os.getpid()),
                                 request_path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, close_fds=True, start_new_session=True)
    except OSError as exc:
        raise GraftError("model_failed", f"no process to run the models in: {exc}") from None


def _answer(proc: subprocess.Popen, deadline: float, should_cancel: Callable[[], bool] | None) -> dict:
    """The child's one answer line, waited for with the cancel and the budget checked every POLL_SECONDS;
    anything but a JSON object is model_failed."""
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            if should_cancel is not None and should_cancel():
                raise GraftCancelled()
            if time.monotonic() > deadline:
                raise GraftError("eval_timeout", "the models' process did not answer within its budget "
                                 "(GRAFT_EVAL_SECONDS and its start)")
            if not selector.select(POLL_SECONDS):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            if not chunk:
                return _died(proc)
            buffer += chunk
            if len(buffer) > ANSWER_MAX_BYTES:
                raise GraftError("model_failed", "the models' process answered past its size limit")
    try:
        answer = json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise GraftError("model_failed", "the models' process answered nonsense")
    return answer


def _died(proc: subprocess.Popen) -> dict:
    code = proc.wait()
    if code < 0 and -code == signal.SIGKILL:  # the kernel's OOM killer, most likely
        raise GraftError("model_too_large", "the process running the models was killed (SIGKILL), most likely "
                         "out of memory: lower the window (GRAFT_PROBE_MAX_TOKENS) or give smaller models")
    what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    raise GraftError("model_failed", f"the process running the models died ({what}) before answering")


def _stop(proc: subprocess.Popen) -> None:
    """Killed and reaped on every path, with its session while it runs (the tokenizer's child it may have
    started dies with it in any case: its parent-death signal)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    if proc.stdout is not None and not proc.stdout.closed:
        proc.stdout.close()


def evaluate(output: ResolvedModel, target_base: ResolvedModel, source_finetuned: ResolvedModel, spec, *,
             settings: EngineSettings, device: str, should_cancel: Callable[[], bool] | None,
             roots: tuple[list[str] | None, list[str] | None]) -> dict:
    """evaluate_graft, in a child process unless GRAFT_EVAL_ISOLATION=inline. `roots`: the request's
    (allowed, denied) confinement, under which the child resolves the models again."""
    from worker.engine.checks.evaluation.evaluate import evaluate_graft

    if not isolated(settings):
        return evaluate_graft(output, target_base, source_finetuned, spec, settings=settings, device=device,
                              should_cancel=should_cancel)
    models = {"output": output, "target_base": target_base, "source_finetuned": source_finetuned}
    return run_in_child("evaluate", models, {"spec": spec.model_dump(mode="json")}, settings=settings,
                        device=device, allowed_roots=roots[0], denied_roots=roots[1], should_cancel=should_cancel)


def probe(source_base: ResolvedModel, target_base: ResolvedModel, tokenizer_from: ResolvedModel, *,
          text: str | None, settings: EngineSettings, device: str, should_cancel: Callable[[], bool] | None,
          roots: tuple[list[str] | None, list[str] | None]) -> dict:
    """The function level's function_probe, in a child process unless GRAFT_EVAL_ISOLATION=inline."""
    from worker.engine.checks.inspect.function import function_probe

    if not isolated(settings):
        return function_probe(source_base, target_base, tokenizer_from, text=text, settings=settings, device=device,
                              should_cancel=should_cancel)
    models = {"source_base": source_base, "target_base": target_base, "tokenizer_from": tokenizer_from}
    return run_in_child("probe", models, {"text": text}, settings=settings, device=device, allowed_roots=roots[0],
                        denied_roots=roots[1], should_cancel=should_cancel)
