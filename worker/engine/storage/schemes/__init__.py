"""Storage schemes: one module each, registered here and nowhere else.

A scheme's module holds its URI parsing, its store (reader) and sink (writer) factories, how its client
library's failures are classified and, as data, how the service confines it (see base.Scheme). Parsing,
opening, fault classification, the service's URI policy and the readiness probe all read this table.

Adding one (gs://, az://): write its module, whose `SCHEME` is a base.Scheme, and add its line below. Rows
are module paths, imported on first use: the API process must not pay for a storage client library.
"""

from __future__ import annotations

import re
from importlib import import_module

from worker.engine.errors import GraftError
from worker.engine.storage.schemes.base import Scheme

SCHEMES: dict[str, str] = {
    "file": "worker.engine.storage.schemes.local",
    "s3": "worker.engine.storage.schemes.s3",
    "hf": "worker.engine.storage.schemes.hf",
}
BARE = "file"  # a reference without "://" is a path of this scheme (a local path)


def find(name: str) -> Scheme | None:
    """The scheme registered as `name` (lower case), or None."""
    path = SCHEMES.get(name)
    return None if path is None else import_module(path).SCHEME


def get(name: str, *, field: str = "uri") -> Scheme:
    scheme = find(name)
    if scheme is None:
        raise GraftError("invalid_uri", f"{field}: unsupported scheme {name!r} ({names()})")
    return scheme


def every() -> list[Scheme]:
    return [import_module(path).SCHEME for path in SCHEMES.values()]


def _listed(items: list[str]) -> str:
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def names() -> str:
    """'file, s3 or hf': the registered schemes, for messages."""
    return _listed(list(SCHEMES))


def forms() -> str:
    """'file:///abs/path, s3://bucket/prefix or hf://org/name': how each scheme's URIs look, for messages."""
    return _listed([s.example for s in every()])


def _names(writable: bool) -> list[str]:
    return [name for name in SCHEMES if not writable or get(name).writable]


def prefixes(*, writable: bool = False) -> str:
    """'file://, s3:// or hf://' (only the schemes that take outputs, with `writable`), for messages."""
    return _listed([f"{name}://" for name in _names(writable)])


def pattern(*, writable: bool = False) -> str:
    """'[Ff][Ii][Ll][Ee]|[Ss]3|[Hh][Ff]': the scheme names as a regex alternation matching either case (the
    API's JSON Schema patterns take no flags)."""
    def either(char: str) -> str:
        return f"[{char.upper()}{char.lower()}]" if char.isalpha() else re.escape(char)

    return "|".join("".join(either(c) for c in name) for name in _names(writable))


__all__ = ["BARE", "SCHEMES", "Scheme", "every", "find", "forms", "get", "names", "pattern", "prefixes"]
