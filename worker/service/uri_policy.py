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
  *.safetensors directly in it), a published graft result, or an output another job is writing, nor through
  an existing file; checked by the API (jobs, preflights, previews) and again by the worker, which leaves the
  output's own contents to the sink (a retry finds its earlier attempt's files and claim there).
- hf:// only when GRAFT_HF_ENABLED. Bare paths are refused: the API has no working directory a client could mean.

Refusals say the same thing whether or not the path exists, so they cannot be used to probe the disk. (The
placement check names what it found, but only on the output's own path, where the tenant may already look.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from worker.engine.errors import GraftError
from worker.engine.storage.uris import Location, parse_uri
from worker.service.settings import Settings

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "graft-manifest.json"  # the engine's name for it (engine.storage.sinks imports boto3; this stays light)
# What the sinks write first for an output still being written (worker.engine.storage.sinks' names, held equal by a
# test): an S3 prefix's claim, and a local output's hidden sibling `.<name>.graft-tmp-<hex>` with its owner file.
PENDING = ".graft-pending"
OWNER = ".graft-owner"
STAGING = ".graft-tmp-"
MAX_OUTPUT_DEPTH = 32  # S3 output prefixes: each ancestor is checked for a result, so their number is capped
# What makes a directory or prefix one that no output may be placed in, besides *.safetensors, strongest reason
# first (a result holds a model's files too; a graft being written may hold its first shards): found by these
# fixed names even in a directory too large to list.
PLACEMENT_NAMES = (MANIFEST, PENDING, OWNER, "config.json", "model.safetensors.index.json", "model.safetensors")
_RANK = {MANIFEST: 0, PENDING: 1, OWNER: 1}
SHARD_PREFIX = "model"  # what shards are conventionally named (model-00001-of-00002.safetensors)
LISTING_PAGE = 100  # S3 entries listed per prefix by the output's placement check (one more page for shards)
LOCAL_SCAN = 10_000  # local entries looked at per directory: os.scandir is cheap, a bound still holds
T = TypeVar("T")
NOT_ALLOWED = "not allowed: outside what this tenant may use (symlinks are resolved)"
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


def check_output_placement(loc: Location, field: str, settings: Settings, *, tenant: str | None = None,
                           itself: bool = True) -> None:
    """Refuse an output placed in a model's directory, a published result or an output being written: at or
    under a directory or prefix that directly holds config.json, a safetensors index, *.safetensors,
    graft-manifest.json or a sink's in-progress marker (S3's claim, a local output's staging directory beside
    it), or one whose path runs through an existing file. The walk goes up to the outermost allowed root
    (file://; above it only for a manifest, as before) or the bucket root (s3://).
    `itself=False` leaves the output location's own contents to the sink: a worker's retry finds its earlier
    attempt's files and claim there. Touches storage: call it off the event loop."""
    if loc.scheme == "file":
        _check_local_placement(loc, field, scope_for(tenant, settings), itself)
    elif loc.scheme == "s3":
        _check_s3_placement(loc, field, settings, itself)


def _rank(name: str) -> int | None:
    if name in _RANK:
        return _RANK[name]
    return 2 if name in PLACEMENT_NAMES or name.endswith(".safetensors") else None


def _strongest(names, unknown: Callable[[str], bool], exists: Callable[[str], bool]) -> str | None:
    """The strongest marker among the listed `names`, or among the fixed names the listing did not reach
    (`unknown`), looked up one by one only while they could outrank what was found."""
    best = min((n for n in names if _rank(n) is not None), key=lambda n: (_rank(n), n), default=None)
    for name in PLACEMENT_NAMES:
        if best is not None and _rank(name) >= _rank(best):
            break
        if unknown(name) and exists(name):
            return name
    return best


def _refuse_placement(field: str, where: str | None, marker: str, *, staging: bool = False) -> PolicyError:
    found = f" ({where} holds {marker})" if where else ""
    if marker == MANIFEST:
        return PolicyError(field, f"inside a graft result{found}; choose a location outside it")
    if staging or _rank(marker) == 1:
        return PolicyError(field, f"another job is writing there{found}; choose another location")
    return PolicyError(field, f"inside a model's directory{found}; choose a location outside it")


def _check_local_placement(loc: Location, field: str, scope: Scope, itself: bool) -> None:
    real = _real(loc.path)
    roots = [r for r in (os.path.realpath(r) for r in scope.file_roots) if _under(real, r)]
    top = min(roots, key=len) if roots else "/"
    directory, child = (real, None) if itself else (os.path.dirname(real), os.path.basename(real))
    own = not itself  # the first level's child is the output itself, whose staging is the sink's to judge
    while True:
        if not _under(directory, top):  # the operator's side of the root: only a published result still counts
            if os.path.exists(os.path.join(directory, MANIFEST)):
                raise _refuse_placement(field, None, MANIFEST)
        elif os.path.lexists(directory) and not os.path.isdir(directory):
            raise PolicyError(field, f"runs through an existing file (file://{directory}); choose a directory")
        else:
            names, complete = _local_names(directory, field)
            marker = _strongest(names, lambda _, c=complete: not c,
                                lambda n, d=directory: os.path.lexists(os.path.join(d, n)))
            # Another job's output at or above ours is staged beside it until it is renamed into place.
            staged = next((n for n in names if n.startswith(f".{child}{STAGING}")), None) if child and not own else None
            if staged is not None and (marker is None or _rank(marker) > 1):
                raise _refuse_placement(field, f"file://{directory}", staged, staging=True)
            if marker is not None:
                raise _refuse_placement(field, f"file://{directory}", marker)
        if directory in ("/", ""):
            return
        directory, child, own = os.path.dirname(directory), os.path.basename(directory), False


def _local_names(directory: str, field: str) -> tuple[list[str], bool]:
    """The names directly in `directory` (none where it does not exist), at most LOCAL_SCAN of them, and
    whether that was all."""
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry, _ in zip(entries, range(LOCAL_SCAN + 1), strict=False)]
    except (FileNotFoundError, NotADirectoryError):
        return [], True
    except PermissionError:  # not the storage's passing fault: a retry would meet it again
        raise PolicyError(field, f"cannot be checked: file://{directory} cannot be listed by the server") from None
    except OSError as exc:
        raise GraftError("storage_error", f"{field}: cannot check the output location: {exc.strerror}") from None
    return names[:LOCAL_SCAN], len(names) <= LOCAL_SCAN


def _check_s3_placement(loc: Location, field: str, settings: Settings, itself: bool) -> None:
    from worker.engine.storage.s3 import s3_client
    from worker.engine.storage.sinks import object_exists

    # The shared, pooled client of this endpoint: its connections outlive this check, as everyone's do.
    client = s3_client(settings.s3_endpoint_url, settings.storage_timeout_seconds)
    parts = loc.prefix.split("/")
    # (the directory's prefix, the name below it the output's path continues through), deepest first
    levels = [("/".join(parts[:depth]) + "/" if depth else "", parts[depth] if depth < len(parts) else None)
              for depth in range(len(parts), -1, -1)]
    for directory, child in levels if itself else levels[1:]:
        names, known = _s3_listing(client, loc.bucket, directory, field)

        def exists(name: str, directory: str = directory) -> bool:
            return _ask(field, lambda: object_exists(client, loc.bucket, directory + name))

        marker = _strongest(names, lambda n, known=known: not known(n), exists)
        where = f"s3://{loc.bucket}/{directory.rstrip('/')}" if directory else f"s3://{loc.bucket}"
        if marker is not None:
            raise _refuse_placement(field, where, marker)
        if child is not None and (child in names or (not known(child) and exists(child))):
            raise PolicyError(field, f"runs through an existing object (s3://{loc.bucket}/{directory}{child}); "
                              "choose a prefix")


def _s3_listing(client, bucket: str, directory: str, field: str) -> tuple[set[str], Callable[[str], bool]]:
    """The names of the objects directly under `directory` that one page of LISTING_PAGE entries holds, and
    which names that listing answers for (absent from the names: not there). Past a full page, one more
    page of the names starting with SHARD_PREFIX, so that a directory of shards alone is still found."""
    def page(prefix: str) -> tuple[set[str], str | None]:
        """(names, the last entry reached where the page was full; None where the listing was all)."""
        answer = _ask(field, lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/",
                                                            MaxKeys=LISTING_PAGE), absent=("NoSuchBucket",))
        if answer is None:  # nothing is stored there; the sink reports the bucket
            return set(), None
        keys = [obj["Key"][len(directory):] for obj in answer.get("Contents", ())]
        entries = keys + [p["Prefix"][len(directory):] for p in answer.get("CommonPrefixes", ())]
        return set(keys), (max(entries) if answer.get("IsTruncated") and entries else None)

    names, last = page(directory)
    if last is None:
        return names, lambda name: True
    # S3 lists in byte order: every name up to `last` was on the page, shards included where it went past them.
    shards = last < SHARD_PREFIX or last.startswith(SHARD_PREFIX)
    shards_last = None
    if shards:
        shard_names, shards_last = page(directory + SHARD_PREFIX)
        names |= shard_names

    def known(name: str) -> bool:
        if name <= last:
            return True
        return shards and name.startswith(SHARD_PREFIX) and (shards_last is None or name <= shards_last)

    return names, known


def _ask(field: str, request: Callable[[], T], absent: tuple[str, ...] = (), default: T | None = None) -> T | None:
    """One storage request of the placement check: an error code in `absent` means nothing is stored there
    (`default`); any other failure is the storage's, worth a retry (the API answers 503, the worker retries)."""
    from worker.engine.storage.faults import error_code

    try:
        return request()
    except Exception as exc:
        if error_code(exc) in absent:
            return default
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
