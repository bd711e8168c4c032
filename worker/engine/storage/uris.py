"""Model and output references: what a URI names, parsed once and checked for shape."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from worker.engine.errors import GraftError

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """Where a model directory (or an output prefix) lives."""

    scheme: str  # "file", "s3" or "hf"
    path: str = ""  # absolute local path for file
    bucket: str = ""  # s3
    prefix: str = ""  # s3 key prefix without trailing slash; hf: unused
    repo: str = ""  # hf repo id
    revision: str | None = None  # hf revision asked for

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}{rev}"

    def child(self, name: str) -> Location:
        """The location of a sub-directory (used for default per-job output prefixes)."""
        if self.scheme == "file":
            return Location("file", path=os.path.join(self.path, name))
        if self.scheme == "s3":
            prefix = f"{self.prefix}/{name}" if self.prefix else name
            return Location("s3", bucket=self.bucket, prefix=prefix)
        raise GraftError("invalid_uri", f"cannot write under {self}")


def parse_uri(uri: str, *, field: str = "uri") -> Location:
    """Parse a local path, file:///abs, s3://bucket/prefix or hf://org/name[@rev]."""
    if not isinstance(uri, str) or not uri.strip():
        raise GraftError("invalid_uri", f"{field}: empty URI")
    uri = uri.strip()
    if "\x00" in uri:
        raise GraftError("invalid_uri", f"{field}: NUL byte in URI")
    if "://" not in uri:
        return Location("file", path=os.path.abspath(os.path.expanduser(uri)))
    try:
        parsed = urlparse(uri)
    except ValueError as exc:  # e.g. an unbalanced '[' or ']' in the authority
        raise GraftError("invalid_uri", f"{field}: not a valid URI: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise GraftError("invalid_uri", f"{field}: file URIs name no host: {uri}")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise GraftError("invalid_uri", f"{field}: file URI must be absolute: {uri}")
        return Location("file", path=os.path.normpath(path))
    if scheme == "s3":
        bucket = parsed.netloc
        if not _BUCKET.match(bucket):
            raise GraftError("invalid_uri", f"{field}: not a valid bucket name in {uri}")
        prefix = parsed.path.strip("/")
        if any(part in ("..", ".") for part in prefix.split("/")):
            raise GraftError("invalid_uri", f"{field}: '.' or '..' segments in {uri}")
        return Location("s3", bucket=bucket, prefix=prefix)
    if scheme == "hf":
        rest = uri[len("hf://"):]
        repo, _, revision = rest.partition("@")
        repo = repo.strip("/")
        if not _HF_REPO.match(repo):
            raise GraftError("invalid_uri", f"{field}: not a hub repository id: {uri}")
        return Location("hf", repo=repo, revision=revision or None)
    raise GraftError("invalid_uri", f"{field}: unsupported scheme {scheme!r} (file, s3 or hf)")
