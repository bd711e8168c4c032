"""The child process of text.py (run by path with `python -I`; loading.load_tokenizer imports it for
check_tokenizer_class alone, and nothing runs on import): a tenant's
tokenizer and chat template, used on requests read from stdin, one JSON line each, answered on stdout, one
JSON line each. Only transformers' tokenizer code is imported (torch is kept out: a second or two to start,
not several); the limits are set once the imports are done, so they bound the tenant's files, not ours.

Requests: {"op": "load", "dir", "memory", "cpu", "rendered_max"} -> {"chat_template": bool,
                                                                        "unk_token_id": int | None}
          {"op": "encode", "texts", "special", "max_tokens", "coverage"} -> {"ids": [[int]],
                                        "coverage" (when asked): [{"characters": int, "dropped": int}]}
          {"op": "render", "prompts"} -> {"texts": [str]}
          {"op": "decode", "ids": [[int]]} -> {"texts": [str]}
Answers: {"ok": ...} or {"error": {"code", "message"}}. Anything raised (a panic of the tokenizers library
included: a BaseException) is an error answer; running out of the limits ends the process, which the parent
reports."""

import json
import os
import resource
import sys

STATE = {"tokenizer": None, "rendered_max": 0}


def vm_size() -> int:
    """This process's address space now, in bytes (0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def limits(memory: int, cpu: int) -> None:
    vm = vm_size()
    if vm:
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def said(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_tokenizer_class(directory: str) -> None:
    """A `tokenizer_class` (tokenizer_config.json's, else config.json's) that transformers resolves to
    something other than a tokenizer is refused: AutoTokenizer would ask that class (AutoModelForCausalLM,
    say) to load itself from the directory. Also imported by loading.load_tokenizer."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    for file in ("tokenizer_config.json", "config.json"):
        path = os.path.join(directory, file)
        if not os.path.exists(path):
            continue
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read())
        except (ValueError, RecursionError) as exc:
            raise Refusal("no_tokenizer", f"its {file} is not valid JSON: {said(exc)}") from None
        name = doc.get("tokenizer_class") if isinstance(doc, dict) else None
        if name is None:
            continue
        if not isinstance(name, str) or len(name) > 200:
            raise Refusal("no_tokenizer", f"its tokenizer_class ({file}) is not a class name")
        for candidate in (name, name.removesuffix("Fast"), f"{name}Fast"):
            try:
                found = tokenizer_class_from_name(candidate)
            except Exception:  # a module transformers cannot import here: not a tokenizer it can build either
                found = None
            if found is not None and not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
                raise Refusal("no_tokenizer", f"its tokenizer_class {name!r} ({file}) is not a tokenizer class")


def load(req: dict) -> dict:
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    limits(int(req["memory"]), int(req["cpu"]))
    STATE["rendered_max"] = int(req["rendered_max"])
    check_tokenizer_class(req["dir"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(req["dir"], local_files_only=True, trust_remote_code=False)
    except BaseException as exc:
        raise Refusal("no_tokenizer", f"its tokenizer files do not make a tokenizer: {said(exc)}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise Refusal("no_tokenizer", f"its tokenizer files make a {type(tokenizer).__name__}, not a tokenizer")
    STATE["tokenizer"] = tokenizer
    return {"chat_template": bool(getattr(tokenizer, "chat_template", None)), "unk_token_id": unknown_id(tokenizer)}


# Tokens an encoding inserts itself (a BOS, an end of text, BERT's CLS and SEP): an unknown token that is
# one of them (GPT-2's is its end-of-text token) cannot be told from what the encoding added. A pad or mask
# token never appears in an encoded text, so an unknown token that is also one (a Llama 2 fine-tune's
# `pad_token: <unk>`) is still counted.
INSERTED_TOKENS = ("bos", "eos", "sep", "cls")


def unknown_id(tokenizer) -> int | None:
    """The id text is mapped to when the vocabulary cannot spell it; None without one of its own (one the
    encoding inserts: INSERTED_TOKENS)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(unk, int) or isinstance(unk, bool) or unk < 0:
        return None
    others = [getattr(tokenizer, f"{name}_token_id", None) for name in INSERTED_TOKENS]
    return None if unk in others else unk


def encode(req: dict) -> dict:
    tokenizer = STATE["tokenizer"]
    out, coverage = [], []
    cap = req.get("max_tokens")
    for text in req["texts"]:
        offsets = bool(req.get("coverage")) and bool(getattr(tokenizer, "is_fast", False))
        enc = None
        if offsets:
            try:
                enc = tokenizer(text, add_special_tokens=bool(req["special"]), verbose=False,
                                return_offsets_mapping=True)
            except Exception:  # offsets are a nicety of coverage: a tokenizer without them is read without
                offsets = False
            except BaseException as exc:  # a panic of the tokenizers library: the text cannot be read at all
                raise Refusal("tokenizer_failed", f"its tokenizer fails on a text: {said(exc)}") from None
        if enc is None:
            try:
                enc = tokenizer(text, add_special_tokens=bool(req["special"]), verbose=False)
            except BaseException as exc:
                raise Refusal("tokenizer_failed", f"its tokenizer fails on a text: {said(exc)}") from None
        ids = enc["input_ids"]
        kept = ids[:int(cap)] if cap is not None else ids
        if req.get("coverage"):
            coverage.append(covered(tokenizer, text, ids, kept, enc.get("offset_mapping") if offsets else None))
        out.append([int(i) for i in kept])
    return {"ids": out, **({"coverage": coverage} if req.get("coverage") else {})}


def covered(tokenizer, text: str, ids: list, kept: list, offsets: list | None) -> dict:
    """How many characters of the text the kept ids fail to spell: those the text holds more of than the
    ids decode to (a multiset difference: blind to the order, and to what a decoder adds, such as spaces
    between tokens, but not to what a tokenizer without an unknown token drops, nor to what it maps to one,
    the unknown token being special and so not decoded). Of the text the kept ids cover: up to the end of
    the last kept token's offsets when the ids were cut (a fast tokenizer), else all of it."""
    from collections import Counter

    part = text
    if len(kept) < len(ids):
        if offsets is not None:
            part = text[:max((int(end) for _, end in offsets[:len(kept)]), default=0)]
        else:
            kept = ids  # no offsets to find where the cut falls: the whole text against all its ids
    try:
        decoded = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    except BaseException as exc:
        raise Refusal("tokenizer_failed", f"its tokenizer fails to decode: {said(exc)}") from None
    missing = Counter(part)
    missing.subtract(Counter(decoded) if isinstance(decoded, str) else Counter())
    return {"characters": len(part), "dropped": sum(n for n in missing.values() if n > 0)}


def render(req: dict) -> dict:
    """As tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
    tokenize=False): the template the tokenizer picks, its special tokens as template variables."""
    tokenizer = STATE["tokenizer"]
    try:
        template = tokenizer.get_chat_template()
    except BaseException as exc:
        raise Refusal("chat_template_failed", f"its chat template cannot be used: {said(exc)}") from None
    if not isinstance(template, str):
        raise Refusal("chat_template_failed", "its chat template is not text")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # transformers before render_jinja_template
        render_jinja_template = None
    variables = dict(tokenizer.special_tokens_map)
    texts = []
    for prompt in req["prompts"]:
        messages = [{"role": "user", "content": prompt}]
        try:
            if render_jinja_template is not None:
                text = render_jinja_template(conversations=[messages], chat_template=template,
                                             add_generation_prompt=True, **variables)[0][0]
            else:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except MemoryError:
            raise Refusal("chat_template_failed", "its chat template needs more memory than it may have") from None
        except RecursionError:
            raise Refusal("chat_template_failed", "its chat template recurses too deeply") from None
        except BaseException as exc:
            raise Refusal("chat_template_failed", f"its chat template fails on a prompt: {said(exc)}") from None
        if not isinstance(text, str):
            raise Refusal("chat_template_failed", "its chat template did not render to text")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > STATE["rendered_max"]:
            raise Refusal("chat_template_failed", f"its chat template renders a prompt to {size:,} bytes; at most "
                          f"{STATE['rendered_max']:,} are taken")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Refusal("chat_template_failed", "its chat template renders text that is not valid Unicode (a "
                          "lone surrogate)") from None
        texts.append(text)
    return {"texts": texts}


def decode(req: dict) -> dict:
    tokenizer = STATE["tokenizer"]
    try:
        return {"texts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in req["ids"]]}
    except BaseException as exc:
        raise Refusal("tokenizer_failed", f"its tokenizer fails to decode: {said(exc)}") from None


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


OPS = {"load": load, "encode": encode, "render": render, "decode": decode}


def die_with_parent(parent: int) -> None:
    """SIGKILL when the process that started this one ends (a work horse killed by its worker or by the OOM
    killer would otherwise leave this one spinning on a template until its CPU limit)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def main() -> None:
    die_with_parent(int(sys.argv[1]))
    sys.modules["torch"] = None  # transformers' tokenizers without torch: imports in a second, not three
    import transformers
    from transformers import AutoTokenizer  # noqa: F401  (imported before the limits are set)
    from transformers.models.auto import tokenization_auto  # noqa: F401

    transformers.logging.set_verbosity_error()
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            answer = {"ok": OPS[req["op"]](req)}
        except Refusal as exc:
            answer = {"error": {"code": exc.code, "message": exc.message}}
        except MemoryError:
            answer = {"error": {"code": "tokenizer_failed", "message": "it needs more memory than it may have"}}
        except BaseException as exc:
            answer = {"error": {"code": "tokenizer_failed", "message": said(exc)}}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
