"""Model and output references: what a URI names, parsed once and checked for shape by its scheme
(storage/schemes/: one module each)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from worker.engine.errors import GraftError
from worker.engine.storage import schemes


@dataclass(frozen=True)
class Location:
    """Where a model directory (or an output prefix) lives; which fields a scheme uses is its own."""

    scheme: str  # a name in schemes.SCHEMES: "file", "s3", "hf"
    path: str = ""  # absolute local path (file)
    bucket: str = ""  # the container (s3)
    prefix: str = ""  # key prefix in the container, without trailing slash (s3)
    repo: str = ""  # repository id (hf)
    revision: str | None = None  # the repository's revision asked for (hf)

    def __str__(self) -> str:
        return schemes.get(self.scheme).render(self)

    def child(self, name: str) -> Location:
        """The location of a sub-directory (used for default per-job output prefixes)."""
        return schemes.get(self.scheme).child(self, name)


def parse_uri(uri: str, *, field: str = "uri") -> Location:
    """Parse a local path or a URI of a registered scheme: file:///abs, s3://bucket/prefix, hf://org/name[@rev]."""
    if not isinstance(uri, str) or not uri.strip():
        raise GraftError("invalid_uri", f"{field}: empty URI")
    uri = uri.strip()
    if "\x00" in uri:
        raise GraftError("invalid_uri", f"{field}: NUL byte in URI")
    if "://" not in uri:
        return schemes.get(schemes.BARE).parse_bare(uri)
    try:
        parsed = urlparse(uri)
    except ValueError as exc:  # e.g. an unbalanced '[' or ']' in the authority
        raise GraftError("invalid_uri", f"{field}: not a valid URI: {exc}") from None
    return schemes.get(parsed.scheme.lower(), field=field).parse(uri, parsed, field)
