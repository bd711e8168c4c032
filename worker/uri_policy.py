"""Which model and output URIs a job may name: checked by the API before queueing and again by the worker
(a symlink can change between the two).

- file:// only under GRAFT_ALLOWED_ROOTS, after resolving symlinks; any `..` segment is refused outright.
- s3:// only to GRAFT_ALLOWED_BUCKETS (unset: any bucket on the configured endpoint). The endpoint is ours:
  a URI carries no host, port, credentials, query or fragment (no SSRF through a model reference).
- hf:// only when GRAFT_HF_ENABLED.
- Bare paths are refused: the API has no working directory a client could mean.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from .engine.errors import GraftError
from .engine.uris import Location, parse_uri
from .settings import Settings


class PolicyError(GraftError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__("uri_not_allowed", f"{field}: {message}", {"field": field})
        self.field = field


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _real(path: str) -> str:
    """realpath of the deepest existing ancestor joined with the rest (outputs need not exist yet)."""
    head, tail = path, []
    while not os.path.lexists(head) and head not in ("/", ""):  # a dangling symlink is resolved, not skipped
        head, name = os.path.split(head)
        tail.append(name)
    return os.path.join(os.path.realpath(head), *reversed(tail))


def check_uri(uri: str, field: str, settings: Settings, *, output: bool = False) -> Location:
    if not isinstance(uri, str) or "://" not in uri:
        raise PolicyError(field, "give a URI with a scheme: file:///abs/path, s3://bucket/prefix or hf://org/name")
    parts = urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise PolicyError(field, "query strings and fragments are not allowed in model URIs")
    if scheme in ("s3", "file") and ("@" in parts.netloc or ":" in parts.netloc):
        raise PolicyError(field, "URIs name no host, port or credentials; the storage endpoint is configured")
    try:
        loc = parse_uri(uri, field=field)
    except GraftError as err:
        raise PolicyError(field, err.message.removeprefix(f"{field}: ")) from err
    if loc.scheme == "file":
        if ".." in unquote(parts.path).split("/"):
            raise PolicyError(field, "'..' segments are not allowed")
        if "\x00" in loc.path:  # %00: os.path.exists() says False to it, so the root check below would pass
            raise PolicyError(field, "NUL byte in the path")
        roots = [os.path.realpath(r) for r in settings.allowed_root_list]
        if not roots:
            raise PolicyError(field, "file:// URIs are disabled (GRAFT_ALLOWED_ROOTS is not set)")
        real = _real(loc.path)
        if not any(_under(real, root) for root in roots) or not any(_under(loc.path, r) for r in
                                                                   settings.allowed_root_list + roots):
            raise PolicyError(field, "path is outside the allowed roots (symlinks are resolved)")
        return loc
    if loc.scheme == "s3":
        buckets = settings.allowed_bucket_list
        if buckets and loc.bucket not in buckets:
            raise PolicyError(field, f"bucket {loc.bucket!r} is not allowed")
        if output and not loc.prefix:
            raise PolicyError(field, "an output needs a prefix under the bucket")
        return loc
    if loc.scheme == "hf":
        if output:
            raise PolicyError(field, "outputs go to file:// or s3://")
        if not settings.hf_enabled:
            raise PolicyError(field, "hf:// models are disabled on this server")
        return loc
    raise PolicyError(field, f"unsupported scheme {scheme!r}")


def output_for(job_id: str, output: str | None, settings: Settings) -> str:
    """The job's output URI: the one asked for, else GRAFT_OUTPUT_URI/<job id>/ (checked either way)."""
    if output:
        return str(check_uri(output, "output", settings, output=True))
    if not settings.output_uri:
        raise PolicyError("output", "required: this server has no default output (GRAFT_OUTPUT_URI)")
    # The server's own default is trusted configuration: no allowlist applies to it.
    return str(parse_uri(settings.output_uri.rstrip("/"), field="GRAFT_OUTPUT_URI").child(job_id))
