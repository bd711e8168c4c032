"""Which model and output URIs a tenant may name: checked by the API before queueing and again by the worker
(a symlink can change between the two; the engine then checks every file it opens, see LocalStore).

- file:// only under GRAFT_ALLOWED_ROOTS (shared by every tenant), the tenant's grants and its own output
  namespace, after resolving symlinks; any `..` segment is refused outright.
- s3:// only to GRAFT_ALLOWED_BUCKETS (unset: any bucket on the configured endpoint), the tenant's grants and its
  own output namespace. The endpoint is ours: a URI carries no host, port, credentials, query or fragment.
- The default output (GRAFT_OUTPUT_URI) is split into one namespace per tenant, `<output>/<tenant>/<job id>`:
  whatever lies under GRAFT_OUTPUT_URI outside the caller's own namespace is neither readable nor writable, even
  where an allowed root contains it.
- An output is never placed at or inside a model's directory (config.json, a safetensors index or
  *.safetensors directly in it) or another graft's published result, nor through an existing file; checked
  by the API (jobs, preflights, previews) and again by the worker, which leaves the output's own contents
  to the sink (a retry finds its earlier attempt's files there).
- hf:// only when GRAFT_HF_ENABLED. Bare paths are refused: the API has no working directory a client could mean.

Refusals say the same thing whether or not the path exists, so they cannot be used to probe the disk. (The
placement check names what it found, but only on the output's own path, where the tenant may already look.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .engine.errors import GraftError
from .engine.uris import Location, parse_uri
from .settings import Settings

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "graft-manifest.json"  # the engine's name for it (worker.engine.sinks imports boto3; this stays light)
MAX_OUTPUT_DEPTH = 32  # S3 output prefixes: each ancestor is checked for a result, so their number is capped
# What makes a directory or prefix a model (or a published result) that no output may be placed in, besides
# *.safetensors: the engine reads no model without config.json; the rest are found by the fixed names even in
# a directory too large to list in one page.
PLACEMENT_NAMES = ("config.json", MANIFEST, "model.safetensors", "model.safetensors.index.json")
PLACEMENT_MARKERS = frozenset(PLACEMENT_NAMES)
LISTING_PAGE = 100  # entries looked at per directory by the output's placement check
NOT_ALLOWED = "not allowed: outside what this tenant may use (symlinks are resolved)"


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


def parse_grants(spec: str) -> dict[str, list[Location]]:
    """`alpha=file:///models/a|s3://team-a/models;beta=s3://team-b` -> {tenant: [locations]}."""
    out: dict[str, list[Location]] = {}
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        tenant, sep, uris = entry.partition("=")
        tenant = tenant.strip()
        if not sep or not TENANT_NAME.match(tenant):
            raise ValueError("GRAFT_TENANT_GRANTS must be 'tenant=uri|uri;tenant2=uri'")
        for uri in (u.strip() for u in uris.split("|")):
            loc = parse_uri(uri, field="GRAFT_TENANT_GRANTS")
            if loc.scheme not in ("file", "s3") or "://" not in uri:
                raise ValueError(f"GRAFT_TENANT_GRANTS: {uri!r} is not a file:// or s3:// URI")
            out.setdefault(tenant, []).append(loc)
    return out


@dataclass(frozen=True)
class Scope:
    """What one tenant may name. `tenant=None` is the server itself (no namespace applies)."""

    tenant: str | None
    file_roots: tuple[str, ...]
    s3_prefixes: tuple[tuple[str, str], ...]  # (bucket, prefix): granted beyond the allowed buckets
    buckets: tuple[str, ...]  # empty: any bucket
    outputs: Location | None  # GRAFT_OUTPUT_URI, whose per-tenant split is enforced
    # What is granted to other tenants only: theirs, even where a shared root or bucket contains it.
    reserved_files: tuple[str, ...] = ()
    reserved_s3: tuple[tuple[str, str], ...] = ()

    @property
    def namespace(self) -> Location | None:
        if self.outputs is None or self.tenant is None:
            return None
        return self.outputs.child(self.tenant)

    def engine_roots(self) -> tuple[list[str], list[str]]:
        """(allowed, denied) real directories for the engine's per-file check of local inputs and outputs."""
        allowed = [os.path.realpath(r) for r in self.file_roots]
        denied = [os.path.realpath(r) for r in self.reserved_files]
        if self.outputs is not None and self.outputs.scheme == "file" and self.tenant is not None:
            denied.append(os.path.realpath(self.outputs.path))
            allowed.append(os.path.realpath(self.namespace.path))
        return allowed, denied


def scope_for(tenant: str | None, settings: Settings) -> Scope:
    every = parse_grants(settings.tenant_grants)
    grants = every.get(tenant, []) if tenant else []
    others = [g for t, gs in every.items() if t != tenant for g in gs if g not in grants]
    outputs = parse_uri(settings.output_uri.rstrip("/"), field="GRAFT_OUTPUT_URI") if settings.output_uri else None
    file_roots = list(settings.allowed_root_list) + [g.path for g in grants if g.scheme == "file"]
    prefixes = [(g.bucket, g.prefix) for g in grants if g.scheme == "s3"]
    scope = Scope(tenant, (), (), tuple(settings.allowed_bucket_list), outputs)
    ns = scope.namespace
    if ns is not None and ns.scheme == "file":
        file_roots.append(ns.path)
    elif ns is not None:
        prefixes.append((ns.bucket, ns.prefix))
    return Scope(tenant, tuple(file_roots), tuple(prefixes), scope.buckets, outputs,
                 tuple(g.path for g in others if g.scheme == "file"),
                 tuple((g.bucket, g.prefix) for g in others if g.scheme == "s3"))


def _check_file(loc: Location, raw_path: str, field: str, scope: Scope) -> None:
    if ".." in unquote(raw_path).split("/"):
        raise PolicyError(field, "'..' segments are not allowed")
    if "\x00" in loc.path:  # %00: os.path.exists() says False to it, so the root check below would pass
        raise PolicyError(field, "NUL byte in the path")
    if not scope.file_roots:
        raise PolicyError(field, "file:// URIs are disabled (GRAFT_ALLOWED_ROOTS is not set)")
    roots = [os.path.realpath(r) for r in scope.file_roots]
    real = _real(loc.path)
    if not any(_under(real, root) for root in roots) or not any(
            _under(loc.path, r) for r in list(scope.file_roots) + roots):
        raise PolicyError(field, NOT_ALLOWED)
    allowed, denied = scope.engine_roots()
    for guarded in denied:
        if (_under(real, guarded) or _under(loc.path, guarded)) and not any(
                _under(real, a) and _under(a, guarded) for a in allowed):
            raise PolicyError(field, NOT_ALLOWED)


def _check_s3(loc: Location, field: str, scope: Scope, output: bool) -> None:
    def within(prefixes) -> bool:
        return any(loc.bucket == b and (not p or _under(loc.prefix, p)) for b, p in prefixes)

    granted = within(scope.s3_prefixes)
    if not granted and (within(scope.reserved_s3) or (scope.buckets and loc.bucket not in scope.buckets)):
        raise PolicyError(field, NOT_ALLOWED)
    out = scope.outputs
    in_outputs = (out is not None and out.scheme == "s3" and scope.tenant is not None and loc.bucket == out.bucket
                  and (not out.prefix or _under(loc.prefix, out.prefix)))
    if in_outputs and not _under(loc.prefix, scope.namespace.prefix):
        raise PolicyError(field, NOT_ALLOWED)
    if output and not loc.prefix:
        raise PolicyError(field, "an output needs a prefix under the bucket")
    if output and loc.prefix.count("/") >= MAX_OUTPUT_DEPTH:
        raise PolicyError(field, f"an output prefix may have at most {MAX_OUTPUT_DEPTH} levels")


def check_uri(uri: str, field: str, settings: Settings, *, output: bool = False,
              tenant: str | None = None) -> Location:
    if not isinstance(uri, str) or "://" not in uri:
        raise PolicyError(field, "give a URI with a scheme: file:///abs/path, s3://bucket/prefix or hf://org/name")
    try:
        parts = urlsplit(uri.strip())
    except ValueError as exc:  # e.g. an unbalanced '[' or ']' in the authority
        raise PolicyError(field, f"not a valid URI: {exc}") from None
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise PolicyError(field, "query strings and fragments are not allowed in model URIs")
    if scheme in ("s3", "file") and ("@" in parts.netloc or ":" in parts.netloc):
        raise PolicyError(field, "URIs name no host, port or credentials; the storage endpoint is configured")
    try:
        loc = parse_uri(uri, field=field)
    except GraftError as err:
        raise PolicyError(field, err.message.removeprefix(f"{field}: ")) from err
    scope = scope_for(tenant, settings)
    if loc.scheme == "file":
        _check_file(loc, parts.path, field, scope)
        return loc
    if loc.scheme == "s3":
        _check_s3(loc, field, scope, output)
        return loc
    if loc.scheme == "hf":
        if output:
            raise PolicyError(field, "outputs go to file:// or s3://")
        if not settings.hf_enabled:
            raise PolicyError(field, "hf:// models are disabled on this server")
        return loc
    raise PolicyError(field, f"unsupported scheme {scheme!r}")


def check_not_inside_result(loc: Location, field: str, settings: Settings, *, tenant: str | None = None,
                            itself: bool = True) -> None:
    """Refuse an output placed in a model's directory or another graft's published result: at or under a
    directory or prefix that directly holds config.json, a safetensors index, *.safetensors or
    graft-manifest.json, or one whose path runs through an existing file. The walk goes up to the outermost
    allowed root (file://; above it only for a manifest, as before) or the bucket root (s3://).
    `itself=False` leaves the output location's own contents to the sink: a worker's retry finds its earlier
    attempt's files there. Touches storage: call it off the event loop."""
    if loc.scheme == "file":
        _check_local_placement(loc, field, scope_for(tenant, settings), itself)
    elif loc.scheme == "s3":
        _check_s3_placement(loc, field, settings, itself)


def _holds_model(names) -> str | None:
    return next((n for n in names if n in PLACEMENT_MARKERS or n.endswith(".safetensors")), None)


def _refuse_placement(field: str, where: str, marker: str) -> PolicyError:
    if marker == MANIFEST:
        return PolicyError(field, "inside another graft's result; choose a location outside it")
    return PolicyError(field, f"inside a model's directory ({where} holds {marker}); choose a location outside it")


def _check_local_placement(loc: Location, field: str, scope: Scope, itself: bool) -> None:
    real = _real(loc.path)
    roots = [r for r in (os.path.realpath(r) for r in scope.file_roots) if _under(real, r)]
    top = min(roots, key=len) if roots else "/"
    head = real if itself else os.path.dirname(real)
    while True:
        if not _under(head, top):  # the operator's side of the root: only a published result still counts
            if os.path.exists(os.path.join(head, MANIFEST)):
                raise _refuse_placement(field, f"file://{head}", MANIFEST)
        elif os.path.lexists(head) and not os.path.isdir(head):
            raise PolicyError(field, f"runs through an existing file (file://{head}); choose a directory")
        elif (marker := _local_marker(head, field)) is not None:
            raise _refuse_placement(field, f"file://{head}", marker)
        if head in ("/", ""):
            return
        head = os.path.dirname(head)


def _local_marker(directory: str, field: str) -> str | None:
    """A model file directly in `directory` (None where it does not exist): the first LISTING_PAGE entries
    looked at whatever their names, then the fixed names, so a huge directory costs a bounded scan."""
    try:
        with os.scandir(directory) as entries:
            seen = [entry.name for entry, _ in zip(entries, range(LISTING_PAGE + 1), strict=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:  # not the storage's passing fault: a retry would meet it again
        raise PolicyError(field, f"cannot be checked: file://{directory} cannot be listed by the server") from None
    except OSError as exc:
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc.strerror}") from None
    if (marker := _holds_model(seen)) is not None or len(seen) <= LISTING_PAGE:
        return marker
    return next((n for n in PLACEMENT_NAMES if os.path.lexists(os.path.join(directory, n))), None)


def _check_s3_placement(loc: Location, field: str, settings: Settings, itself: bool) -> None:
    from .engine.s3 import s3_client

    client = s3_client(settings.s3_endpoint_url, settings.storage_timeout_seconds)
    parts = loc.prefix.split("/")
    # (the directory's prefix, the name below it the output's path continues through), deepest first
    levels = [("/".join(parts[:depth]) + "/" if depth else "", parts[depth] if depth < len(parts) else None)
              for depth in range(len(parts), -1, -1)]
    for directory, child in levels if itself else levels[1:]:
        names, more = _s3_names(client, loc.bucket, directory, field)
        marker = _holds_model(names)
        if marker is None and more:  # a page did not hold them all: the fixed names, one HEAD each
            marker = next((n for n in PLACEMENT_NAMES if _s3_exists(client, loc.bucket, directory + n, field)),
                          None)
        where = f"s3://{loc.bucket}/{directory.rstrip('/')}" if directory else f"s3://{loc.bucket}"
        if marker is not None:
            raise _refuse_placement(field, where, marker)
        if child is not None and (child in names or (more and _s3_exists(client, loc.bucket, directory + child,
                                                                          field))):
            raise PolicyError(field, f"runs through an existing object (s3://{loc.bucket}/{directory}{child}); "
                              "choose a prefix")


def _s3_names(client, bucket: str, directory: str, field: str) -> tuple[list[str], bool]:
    """The names of the objects directly under `directory` on one page of LISTING_PAGE entries, and whether
    there are more."""
    try:
        page = client.list_objects_v2(Bucket=bucket, Prefix=directory, Delimiter="/", MaxKeys=LISTING_PAGE)
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "") == "NoSuchBucket":
            return [], False  # nothing is stored there; the sink reports the bucket
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc}") from exc
    except Exception as exc:  # connection errors: the storage's fault, worth a retry
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc}") from exc
    return [obj["Key"][len(directory):] for obj in page.get("Contents", ())], bool(page.get("IsTruncated"))


def _s3_exists(client, bucket: str, key: str, field: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc}") from exc
    except Exception as exc:
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc}") from exc


def output_for(job_id: str, output: str | None, settings: Settings, tenant: str | None = None) -> str:
    """The job's output URI: the one asked for, else GRAFT_OUTPUT_URI/<tenant>/<job id>/ (checked either way)."""
    if output:
        return str(check_uri(output, "output", settings, output=True, tenant=tenant))
    if not settings.output_uri:
        raise PolicyError("output", "required: this server has no default output (GRAFT_OUTPUT_URI)")
    base = parse_uri(settings.output_uri.rstrip("/"), field="GRAFT_OUTPUT_URI")
    # The server's own default is trusted configuration: no allowlist applies to it.
    return str(base.child(tenant).child(job_id) if tenant else base.child(job_id))
