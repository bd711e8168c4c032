"""A fine-tune's chat template, rendered within bounds. The template is the tenant's: transformers renders it
in jinja's sandbox, which stops it reaching Python's internals but not spending without limit: nested
`range(100000)` loops run for hours, `'x' * n` or `'{:>999999999}'.format(1)` allocate gigabytes in one C
call, and jinja folds constant expressions (`10 ** 10 ** 10`) while compiling. Neither a deadline checked
between steps nor an exception raised into a thread can stop a C call; a process can be stopped and can be
given limits. So each evaluation renders its prompts in one short-lived child interpreter that imports only
transformers' template code (no torch), under an address-space and a CPU-time limit, stopped past its
wall-clock budget or on a cancel, its output capped; whatever goes wrong is GraftError("chat_template_failed").

The child renders exactly as `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)` does: the template the tokenizer picks (get_chat_template), its special tokens as template
variables, transformers' own render function and sandboxed environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from ..errors import GraftError

TEMPLATE_SECONDS = 30.0  # wall clock for one evaluation's prompts, the child's start (~1-2 s) included
TEMPLATE_MEMORY_BYTES = 512 << 20  # address space the child may add past what its imports took
RENDERED_MAX_BYTES = 64 << 10  # UTF-8 bytes of one rendered prompt (a prompt is 2 KiB at most)
POLL_SECONDS = 0.1  # how often a cancel and the budget are checked while the child runs
CODE = "chat_template_failed"

# Runs in the child: argv = memory bytes, CPU seconds, output cap; the payload (template, template variables,
# conversations) on stdin; one JSON object on stdout: {"texts": [...]} or {"error": "..."}.
_CHILD = r"""
import json, resource, sys

def limits(memory, seconds):
    vm = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    vm = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if vm:
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))

def main():
    memory, seconds, cap = (int(a) for a in sys.argv[1:4])
    payload = json.loads(sys.stdin.buffer.read())
    template, variables = payload["template"], payload["variables"]
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        def render(messages):
            out = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **variables)
            return out[0][0]
    except ImportError:  # transformers before render_jinja_template
        from transformers.utils.chat_template_utils import _compile_jinja_template

        def render(messages):
            return _compile_jinja_template(template).render(messages=messages, add_generation_prompt=True,
                                                            **variables)
    import jinja2  # noqa: F401  (imported before the limits: they are the template's, not the imports')
    limits(memory, seconds)
    texts = []
    for messages in payload["conversations"]:
        try:
            text = render(messages)
        except MemoryError:
            return {"error": f"it needs more than {memory >> 20} MiB of memory"}
        except RecursionError:
            return {"error": "it recurses too deeply"}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if not isinstance(text, str):
            return {"error": "it did not render to text"}
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > cap:
            return {"error": f"it renders a prompt to {size:,} bytes; at most {cap:,} are taken"}
        texts.append(text)
    return {"texts": texts}

try:
    answer = main()
except MemoryError:
    answer = {"error": "it needs more memory than it may have"}
sys.stdout.write(json.dumps(answer))
"""


def template_of(tokenizer) -> str | None:
    """The template apply_chat_template would use (a tokenizer may hold several by name), None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        template = tokenizer.get_chat_template()
    except Exception as exc:  # several named templates and no "default", say
        raise GraftError(CODE, f"source_finetuned: its chat template cannot be used: {str(exc)[:300]}") from None
    if not isinstance(template, str):
        raise GraftError(CODE, "source_finetuned: its chat template is not text")
    return template


def template_variables(tokenizer) -> dict:
    """What apply_chat_template passes the template besides the messages: the special tokens (bos_token, ...)."""
    out = {}
    for key, value in dict(getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if isinstance(value, list | tuple):
            out[key] = [str(v) for v in value]
        elif value is not None:
            out[key] = str(value)
    return out


def render_chat(template: str, variables: dict, prompts: list[str], *,
                check: Callable[[], None] | None = None) -> list[str]:
    """Each prompt as one user turn through `template` with the assistant's turn opened, rendered in a child
    process within TEMPLATE_SECONDS (wall clock), TEMPLATE_MEMORY_BYTES and RENDERED_MAX_BYTES per prompt;
    `check` (a cancel, the evaluation's deadline) is called while it runs and may raise: the child is stopped
    and reaped on every path."""
    seconds, memory_bytes, max_bytes = TEMPLATE_SECONDS, TEMPLATE_MEMORY_BYTES, RENDERED_MAX_BYTES
    payload = json.dumps({"template": template, "variables": variables,
                          "conversations": [[{"role": "user", "content": p}] for p in prompts]}).encode()
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    env["HF_HUB_OFFLINE"] = "1"
    cpu = max(1, int(seconds) + 1)
    proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD, str(memory_bytes), str(cpu), str(max_bytes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, close_fds=True)
    deadline = time.monotonic() + seconds
    out = b""
    try:
        sent = payload
        while True:
            try:
                out, _ = proc.communicate(sent, timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                sent = None  # the input is sent once; communicate goes on sending what is left
            except BrokenPipeError:  # the child died before reading all of it
                proc.wait()
                break
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise GraftError(CODE, f"source_finetuned: its chat template ran past its budget of {seconds:g} s "
                                 "and was stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    return _answer(out, proc.returncode, len(prompts), seconds)


def _answer(out: bytes, returncode: int, expected: int, seconds: float) -> list[str]:
    try:
        answer = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        answer = None
    if not isinstance(answer, dict):
        if returncode in (-24, -9):  # SIGXCPU: the CPU-time limit (SIGKILL: the hard one past it)
            why = f"it ran past its budget of {seconds:g} s of CPU and was stopped"
        else:
            why = f"the renderer stopped (exit status {returncode}) without an answer"
        raise GraftError(CODE, f"source_finetuned: its chat template cannot be rendered: {why}")
    if "error" in answer:
        raise GraftError(CODE, f"source_finetuned: its chat template fails on a prompt: {answer['error']}")
    texts = answer.get("texts")
    if not isinstance(texts, list) or len(texts) != expected or not all(isinstance(t, str) for t in texts):
        raise GraftError(CODE, "source_finetuned: its chat template did not render to text")
    return texts
