"""User regular expressions (the `include`/`exclude` options), matched in linear time with RE2.

Python's `re` backtracks: a pattern such as `(.|.)*Z` over a long tensor name runs for hours holding the
GIL, which froze the API and starved a job's lease thread. RE2 bounds every match by the text's length,
and refuses what it cannot do that way (backreferences, lookaround). One place compiles and caches the
patterns, so the options' validation and the planner's matching cannot disagree.

Differences users meet coming from Python's `re` (search semantics are the same):
- no backreferences (`\\1`), lookahead/lookbehind (`(?=`, `(?!`, `(?<=`, `(?<!`), atomic groups or
  possessive quantifiers, conditionals, `(?#comments)` or the verbose flag `(?x)`;
- `\\Z` is written `\\z`; `$` matches only at the very end (Python's also matches before a final newline);
- `\\d`, `\\w`, `\\s` and `\\b` are ASCII-only;
- a counted repetition is at most 1000 (`{n}`, `{n,}`, `{n,m}`), and `{,m}` is refused: write `{0,m}`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import re2

from worker.engine.errors import GraftError

MAX_PATTERN_LENGTH = 1000  # characters in one pattern
MAX_PATTERNS = 100  # patterns in one list (include or exclude)
MAX_REPEAT = 1000  # largest count in {n,m}; RE2's own limit
MAX_PATTERN_MEMORY = 8 << 20  # bytes RE2 may spend on one compiled pattern

# Only the counts are checked by hand: RE2 reads `a{99999999999}` as the literal text "a{99999999999}"
# (the count does not fit its parser), which is not what anyone who wrote it meant; Python's `re` raised
# OverflowError on it. A backslash escapes the next character; inside [...] braces are literal.
_COUNT = re.compile(r"\{(\d*)(,?)(\d*)\}")


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported to the user, not printed to stderr
    options.max_mem = MAX_PATTERN_MEMORY
    options.never_capture = True  # a yes/no match needs no submatch positions (and is faster without)
    return options


_OPTIONS = _options()


def _shown(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 80 else pattern[:80] + "...")


def _check_counts(pattern: str, field: str) -> None:
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):  # [:alpha:] inside a class: its ']' does not close the class
                end = pattern.find(":]", i + 2)
                i = end + 2 if end >= 0 else i + 1
                continue
            in_class = c != "]"
            i += 1
            continue
        if c == "[":
            in_class = True
            i += 1
            # A ']' right after '[' or '[^' is a literal member, not the end of the class.
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":
                i += 1
            continue
        if c == "{":
            m = _COUNT.match(pattern, i)
            if m and (m.group(1) or m.group(3)):
                low, comma, high = m.groups()
                if not low:
                    raise GraftError("invalid_option", f"{field}: {_shown(pattern)}: write {{0,{high}}} for "
                                     f"'{{,{high}}}' (RE2 would read it as literal text)")
                for number in (low, high):
                    if number and (len(number) > 4 or int(number) > MAX_REPEAT):
                        raise GraftError("invalid_option", f"{field}: {_shown(pattern)}: repetition count "
                                         f"{number[:20]} is above the limit of {MAX_REPEAT}")
                i = m.end()
                continue
        i += 1


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re2._Regexp:
    return re2.compile(pattern, _OPTIONS)


def compile_pattern(pattern: object, field: str) -> re2._Regexp:
    """A user pattern compiled for matching, or GraftError("invalid_option", "<field>: ...")."""
    if not isinstance(pattern, str):
        raise GraftError("invalid_option", f"{field}: patterns are strings, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise GraftError("invalid_option", f"{field}: pattern {_shown(pattern)} is {len(pattern)} characters; "
                         f"the limit is {MAX_PATTERN_LENGTH}")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise GraftError("invalid_option", f"{field}: pattern {_shown(pattern)} is not valid Unicode") from None
    _check_counts(pattern, field)
    try:
        return _compile(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "refused"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise GraftError("invalid_option", f"{field}: bad regular expression {_shown(pattern)}: {reason} "
                         "(patterns use RE2 syntax: no backreferences or lookaround)") from None


def check_patterns(patterns: object, field: str) -> list[str]:
    """Validate one option's list of patterns; returns it as a list of strings."""
    if isinstance(patterns, str | bytes) or not isinstance(patterns, Iterable):
        raise GraftError("invalid_option", f"{field}: expected a list of regular expressions")
    out = list(patterns)
    if len(out) > MAX_PATTERNS:
        raise GraftError("invalid_option", f"{field}: {len(out)} patterns; the limit is {MAX_PATTERNS}")
    for pattern in out:
        compile_pattern(pattern, field)
    return out


def matches_any(patterns: list[str], name: str, field: str) -> bool:
    """Whether any pattern is found in `name` (search semantics, as `re.search`)."""
    # Bytes: a name from a header may hold a lone surrogate, which str -> UTF-8 encoding would refuse.
    text = name.encode("utf-8", "surrogatepass")
    return any(compile_pattern(p, field).search(text) is not None for p in patterns)
