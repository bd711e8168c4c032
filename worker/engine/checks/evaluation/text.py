"""A model's tokenizer and chat template, used in a child process within bounds.

Both are the tenant's files, and both run code of a kind no deadline checked between forward passes can
stop: a chat template is a jinja program (sandboxed against reaching Python's internals, not against
spending: nested `range(100000)` loops run for hours, `'x' * n` allocates gigabytes in one C call, and jinja
folds constant expressions such as `3 ** (10 ** 8)` while compiling); a tokenizer.json carries regular
expressions that the tokenizers library runs with a backtracking engine (in Rust, the GIL released, a panic
past its retry limit that is no Exception), and its size sets the memory it takes. A process can be given
limits and be stopped; a thread can do neither. So the evaluation and the function-level probe reach the
tokenizer only through `open_tokenizer`: a child interpreter (_text_child.py) that imports transformers'
tokenizer code alone (no torch), loads the tokenizer from the files load_tokenizer checks and writes, and
answers encode / render / decode requests, under an address-space limit (TEXT_MEMORY_BYTES past its imports)
and a CPU-time limit, each request within its wall-clock budget, a cancel or the caller's deadline (`check`,
called while it waits) stopping it at once. Whatever goes wrong is a GraftError: no_tokenizer (the files do
not make a tokenizer), chat_template_failed, tokenizer_failed; the child is killed and reaped on every path.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from worker.engine.errors import GraftError
from worker.engine.storage.model import ResolvedModel

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_text_child.py")
TEXT_MEMORY_BYTES = 4 << 30  # address space past the child's imports: a 64 MB tokenizer.json builds in ~2 GB
LOAD_SECONDS = 120.0  # the child's start (a second or two) and the tokenizer's load (~10 s for 64 MB of files)
TEMPLATE_SECONDS = 30.0  # rendering every prompt through the chat template
ENCODE_SECONDS = 60.0  # one encode or decode request (a probe text of 64 KiB: milliseconds for a sane tokenizer)
CPU_SECONDS = 600  # the child's CPU time, all requests together
RENDERED_MAX_BYTES = 64 << 10  # UTF-8 bytes of one rendered prompt (a prompt is 2 KiB at most)
ANSWER_MAX_BYTES = 64 << 20  # one answer line read from the child at most
POLL_SECONDS = 0.1  # how often a cancel and the budget are checked while the child works


class TextModel:
    """A model's tokenizer in its child process; close() (or the `with`) ends the child."""

    def __init__(self, model: ResolvedModel, check: Callable[[], None] | None = None) -> None:
        self.role = model.role
        self.check = check
        self.chat_template = False
        self.unk_token_id: int | None = None
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if key in os.environ}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        from worker.engine.checks.evaluation.loading import write_tokenizer_dir

        with tempfile.TemporaryDirectory(prefix="graft-tokenizer-") as tmp:
            names = write_tokenizer_dir(model, tmp)
            # stderr is discarded: the child's answers say what went wrong, and nothing of it may pile up.
            try:
                self.proc = subprocess.Popen([sys.executable, "-I", CHILD, str(os.getpid())], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                             close_fds=True)
            except OSError as exc:  # no process to be had (memory, a process limit)
                raise GraftError("tokenizer_failed", f"{self.role}: no process for its tokenizer: {exc}") from None
            self._buffer = b""
            try:
                answer = self._ask({"op": "load", "dir": tmp, "memory": TEXT_MEMORY_BYTES, "cpu": CPU_SECONDS,
                                    "rendered_max": RENDERED_MAX_BYTES}, LOAD_SECONDS, "no_tokenizer",
                                   f"its tokenizer files ({', '.join(names)})")
            except BaseException:
                self.close()
                raise
        self.chat_template = bool(answer.get("chat_template"))
        self.unk_token_id = answer.get("unk_token_id") if _is_id(answer.get("unk_token_id")) else None

    # --- requests ---------------------------------------------------------------------------------------

    def encode(self, texts: list[str], *, special: bool, max_tokens: int | None = None) -> list[list[int]]:
        """Each text's token ids (`special`: with the tokenizer's own special tokens, BOS and the like),
        the first `max_tokens`."""
        return self._encode(texts, special, max_tokens, coverage=False)[0]

    def encode_with_coverage(self, texts: list[str], *, special: bool, max_tokens: int | None = None
                             ) -> tuple[list[list[int]], list[dict]]:
        """As encode, and per text {"characters", "dropped"}: how many characters of the text the ids
        cover and how many of them the ids do not spell (_text_child.covered)."""
        return self._encode(texts, special, max_tokens, coverage=True)

    def _encode(self, texts: list[str], special: bool, max_tokens: int | None, *, coverage: bool
                ) -> tuple[list[list[int]], list[dict]]:
        answer = self._ask({"op": "encode", "texts": texts, "special": special, "max_tokens": max_tokens,
                            "coverage": coverage}, ENCODE_SECONDS, "tokenizer_failed", "its tokenizer")
        ids = answer.get("ids")
        if not (isinstance(ids, list) and len(ids) == len(texts)
                and all(isinstance(row, list) and all(_is_id(i) for i in row) for row in ids)):
            raise GraftError("tokenizer_failed", f"{self.role}: its tokenizer did not give token ids")
        counts = answer.get("coverage") if coverage else []
        if coverage and not (isinstance(counts, list) and len(counts) == len(texts) and all(
                isinstance(c, dict) and _is_id(c.get("characters")) and _is_id(c.get("dropped"))
                and c["dropped"] <= c["characters"] for c in counts)):
            raise GraftError("tokenizer_failed", f"{self.role}: its tokenizer did not say what the ids cover")
        return ids, counts

    def render(self, prompts: list[str]) -> list[str]:
        """Each prompt as one user turn through the chat template, the assistant's turn opened."""
        answer = self._ask({"op": "render", "prompts": prompts}, TEMPLATE_SECONDS, "chat_template_failed",
                           "its chat template")
        return self._texts(answer, len(prompts), "chat_template_failed", "its chat template did not render to text")

    def decode(self, ids: list[list[int]]) -> list[str]:
        answer = self._ask({"op": "decode", "ids": ids}, ENCODE_SECONDS, "tokenizer_failed", "its tokenizer")
        return self._texts(answer, len(ids), "tokenizer_failed", "its tokenizer did not decode to text")

    def _texts(self, answer: dict, expected: int, code: str, message: str) -> list[str]:
        texts = answer.get("texts")
        if not (isinstance(texts, list) and len(texts) == expected and all(isinstance(t, str) for t in texts)):
            raise GraftError(code, f"{self.role}: {message}")
        return texts

    # --- the child --------------------------------------------------------------------------------------

    def _ask(self, request: dict, seconds: float, code: str, what: str) -> dict:
        """Send one request and wait for its answer within `seconds`, calling `check` as it waits; a child
        that overruns, dies or answers nonsense is killed and reported as GraftError(code)."""
        if self.proc.poll() is not None:
            raise GraftError(code, f"{self.role}: {what}: the tokenizer process has ended")
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._stop()
            raise GraftError(code, f"{self.role}: {what}: the tokenizer process has ended") from None
        line = self._read_line(seconds, code, what)
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self._stop()
            raise GraftError(code, f"{self.role}: {what}: the tokenizer process answered nonsense")
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise GraftError(str(error.get("code") or code), f"{self.role}: {error.get('message') or what}")
        return answer.get("ok") if isinstance(answer.get("ok"), dict) else {}

    def _read_line(self, seconds: float, code: str, what: str) -> bytes:
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if selector.select(POLL_SECONDS):
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:  # the child ended: a limit (memory, CPU) or a crash
                        status = self.proc.wait()
                        self._stop()
                        if status in (-24, -9):  # SIGXCPU, then SIGKILL: the CPU-time limit
                            why = f"it ran past its {CPU_SECONDS} s of CPU time"
                        elif status == -6:  # SIGABRT: Rust's answer to an allocation refused
                            why = f"it ran out of its memory ({TEXT_MEMORY_BYTES >> 20} MiB)"
                        else:
                            why = f"the tokenizer process stopped (exit status {status})"
                        raise GraftError(code, f"{self.role}: {what} cannot be used: {why}")
                    self._buffer += chunk
                    if len(self._buffer) > ANSWER_MAX_BYTES:
                        self._stop()
                        raise GraftError(code, f"{self.role}: {what}: an answer past {ANSWER_MAX_BYTES:,} bytes")
                    continue
                try:
                    if self.check is not None:
                        self.check()
                except BaseException:
                    self._stop()
                    raise
                if time.monotonic() > deadline:
                    self._stop()
                    raise GraftError(code, f"{self.role}: {what} ran past its budget of {seconds:g} s and was "
                                     "stopped")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self._stop()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> TextModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def open_tokenizer(model: ResolvedModel, *, check: Callable[[], None] | None = None) -> TextModel:
    """The model's tokenizer in its child process (see the module's docstring); use it in a `with`."""
    return TextModel(model, check)
