"""Which model and output URIs a tenant may name: checked by the API before queueing and again by the worker
(a symlink can change between the two; the engine then checks every file it opens, see LocalStore).

Each scheme's module (worker/engine/storage/schemes/) declares which kind of confinement applies to it; the
logic of each kind is here, the same for every scheme of that kind:

- LocalRoots (file://): only under GRAFT_ALLOWED_ROOTS (shared by every tenant), the tenant's grants and its
  own output namespace, after resolving symlinks; any `..` segment is refused outright.
- BucketPrefixes (s3://): only to the containers its allowlist setting names (GRAFT_ALLOWED_BUCKETS; unset:
  any bucket on the configured endpoint), the tenant's grants and its own output namespace. The endpoint is
  ours: a URI carries no host, port, credentials, query or fragment.
- PublicRepos (hf://): only while its setting (GRAFT_HF_ENABLED) is on; never an output.
- A scheme that declares none is refused: the engine and the CLI take it, the service does not.
- The default output (GRAFT_OUTPUT_URI) is split into one namespace per tenant, `<output>/<tenant>/<job id>`:
  whatever lies under GRAFT_OUTPUT_URI outside the caller's own namespace is neither readable nor writable, even
  where an allowed root contains it.
- An output is never placed at or inside a model's directory (config.json, a safetensors index or
  *.safetensors directly in it), a published graft result, or an output another job is writing, nor through
  an existing file; checked by the API (jobs, preflights, previews) and again by the worker, which leaves the
  output's own contents to the sink (a retry finds its earlier attempt's files and claim there).
- Bare paths are refused: the API has no working directory a client could mean.

Refusals say the same thing whether or not the path exists, so they cannot be used to probe the disk. (The
placement check names what it found, but only on the output's own path, where the tenant may already look.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from worker.engine.errors import GraftError
from worker.engine.storage import schemes
from worker.engine.storage.schemes.base import BucketPrefixes, Listing, LocalRoots, Policy, PublicRepos, Scheme
from worker.engine.storage.sinks import MANIFEST, OWNER, PENDING, STAGING
from worker.engine.storage.uris import Location, parse_uri
from worker.service.settings import Settings

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_OUTPUT_DEPTH = 32  # S3 output prefixes: each ancestor is checked for a result, so their number is capped
# What makes a directory or prefix one that no output may be placed in, besides *.safetensors, strongest reason
# first (a result holds a model's files too; a graft being written may hold its first shards): found by these
# fixed names even in a directory too large to list. PENDING, OWNER and STAGING are what the sinks write first
# for an output still being written: an S3 prefix's claim, a local output's hidden sibling and its owner file.
PLACEMENT_NAMES = (MANIFEST, PENDING, OWNER, "config.json", "model.safetensors.index.json", "model.safetensors")
_RANK = {MANIFEST: 0, PENDING: 1, OWNER: 1}
SHARD_PREFIX = "model"  # what shards are conventionally named (model-00001-of-00002.safetensors)
LISTING_PAGE = 100  # S3 entries listed per prefix by the output's placement check (one more page for shards)
LOCAL_SCAN = 10_000  # local entries looked at per directory: os.scandir is cheap, a bound still holds
T = TypeVar("T")
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


def _policy(location: Location | None) -> Policy | None:
    """How the service confines the location's scheme (storage/schemes/): declared there, judged here."""
    scheme = schemes.find(location.scheme) if location is not None else None
    return scheme.policy if scheme is not None else None


def _grantable() -> list[Scheme]:
    return [s for s in schemes.every() if isinstance(s.policy, LocalRoots | BucketPrefixes)]


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
            if not isinstance(_policy(loc), LocalRoots | BucketPrefixes) or "://" not in uri:
                forms = " or ".join(f"{s.name}://" for s in _grantable())
                raise ValueError(f"GRAFT_TENANT_GRANTS: {uri!r} is not a {forms} URI")
            out.setdefault(tenant, []).append(loc)
    return out


Prefix = tuple[str, str, str]  # (scheme, container, key prefix) of a BucketPrefixes scheme


@dataclass(frozen=True)
class Scope:
    """What one tenant may name. `tenant=None` is the server itself (no namespace applies)."""

    tenant: str | None
    file_roots: tuple[str, ...]  # LocalRoots schemes: directories on this machine
    prefixes: tuple[Prefix, ...]  # granted beyond the allowed containers
    containers: tuple[tuple[str, str], ...]  # (scheme, container) allowed; a scheme with none: any container
    outputs: Location | None  # GRAFT_OUTPUT_URI, whose per-tenant split is enforced
    # What is granted to other tenants only: theirs, even where a shared root or container holds it.
    reserved_files: tuple[str, ...] = ()
    reserved_prefixes: tuple[Prefix, ...] = ()

    @property
    def namespace(self) -> Location | None:
        if self.outputs is None or self.tenant is None:
            return None
        return self.outputs.child(self.tenant)

    def engine_roots(self) -> tuple[list[str], list[str]]:
        """(allowed, denied) real directories for the engine's per-file check of local inputs and outputs."""
        allowed = [os.path.realpath(r) for r in self.file_roots]
        denied = [os.path.realpath(r) for r in self.reserved_files]
        if isinstance(_policy(self.outputs), LocalRoots) and self.tenant is not None:
            denied.append(os.path.realpath(self.outputs.path))
            allowed.append(os.path.realpath(self.namespace.path))
        return allowed, denied


def _roots(locations: list[Location]) -> tuple[str, ...]:
    return tuple(g.path for g in locations if isinstance(_policy(g), LocalRoots))


def _prefixes(locations: list[Location]) -> tuple[Prefix, ...]:
    return tuple((g.scheme, g.bucket, g.prefix) for g in locations if isinstance(_policy(g), BucketPrefixes))


def _containers(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Every BucketPrefixes scheme's allowed containers, from the Settings field its policy names (a field
    Settings lacks is an error of the scheme's module, raised here rather than read as "any container")."""
    out = []
    for scheme in schemes.every():
        if isinstance(scheme.policy, BucketPrefixes) and scheme.policy.allowlist:
            listed = str(getattr(settings, scheme.policy.allowlist) or "")
            out += [(scheme.name, c.strip()) for c in listed.split(",") if c.strip()]
    return tuple(out)


def scope_for(tenant: str | None, settings: Settings) -> Scope:
    every = parse_grants(settings.tenant_grants)
    grants = every.get(tenant, []) if tenant else []
    others = [g for t, gs in every.items() if t != tenant for g in gs if g not in grants]
    outputs = parse_uri(settings.output_uri.rstrip("/"), field="GRAFT_OUTPUT_URI") if settings.output_uri else None
    namespace = Scope(tenant, (), (), (), outputs).namespace
    mine = grants + ([namespace] if namespace is not None else [])
    return Scope(tenant, tuple(settings.allowed_root_list) + _roots(mine), _prefixes(mine), _containers(settings),
                 outputs, _roots(others), _prefixes(others))


def _check_file(loc: Location, raw_path: str, field: str, scope: Scope) -> None:
    if ".." in unquote(raw_path).split("/"):
        raise PolicyError(field, "'..' segments are not allowed")
    if "\x00" in loc.path:  # %00: os.path.exists() says False to it, so the root check below would pass
        raise PolicyError(field, "NUL byte in the path")
    if not scope.file_roots:
        raise PolicyError(field, f"{loc.scheme}:// URIs are disabled (GRAFT_ALLOWED_ROOTS is not set)")
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


def _check_bucket(loc: Location, field: str, scope: Scope, output: bool) -> None:
    def within(prefixes) -> bool:
        return any(loc.scheme == s and loc.bucket == b and (not p or _under(loc.prefix, p)) for s, b, p in prefixes)

    granted = within(scope.prefixes)
    listed = [c for s, c in scope.containers if s == loc.scheme]
    if not granted and (within(scope.reserved_prefixes) or (listed and loc.bucket not in listed)):
        raise PolicyError(field, NOT_ALLOWED)
    out = scope.outputs
    in_outputs = (out is not None and out.scheme == loc.scheme and scope.tenant is not None
                  and loc.bucket == out.bucket and (not out.prefix or _under(loc.prefix, out.prefix)))
    if in_outputs and not _under(loc.prefix, scope.namespace.prefix):
        raise PolicyError(field, NOT_ALLOWED)
    if output and not loc.prefix:
        raise PolicyError(field, "an output needs a prefix under the bucket")
    if output and loc.prefix.count("/") >= MAX_OUTPUT_DEPTH:
        raise PolicyError(field, f"an output prefix may have at most {MAX_OUTPUT_DEPTH} levels")


def _check_repo(loc: Location, field: str, settings: Settings, policy: PublicRepos) -> None:
    if not getattr(settings, policy.enabled_by):
        raise PolicyError(field, f"{loc.scheme}:// models are disabled on this server")


def _split(uri: object, field: str) -> SplitResult:
    """The URI's parts, checked for what no model or output URI may carry before it is parsed."""
    if not isinstance(uri, str) or "://" not in uri:
        raise PolicyError(field, f"give a URI with a scheme: {schemes.forms()}")
    try:
        parts = urlsplit(uri.strip())
    except ValueError as exc:  # e.g. an unbalanced '[' or ']' in the authority
        raise PolicyError(field, f"not a valid URI: {exc}") from None
    if parts.query or parts.fragment:
        raise PolicyError(field, "query strings and fragments are not allowed in model URIs")
    scheme = schemes.find(parts.scheme.lower())  # an unknown one: the parse names the supported schemes
    if scheme is not None and scheme.hostless and ("@" in parts.netloc or ":" in parts.netloc):
        raise PolicyError(field, "URIs name no host, port or credentials; the storage endpoint is configured")
    return parts


def check_uri(uri: str, field: str, settings: Settings, *, output: bool = False,
              tenant: str | None = None) -> Location:
    parts = _split(uri, field)
    try:
        loc = parse_uri(uri, field=field)
    except GraftError as err:
        raise PolicyError(field, err.message.removeprefix(f"{field}: ")) from err
    scope = scope_for(tenant, settings)
    scheme = schemes.get(loc.scheme)
    policy = scheme.policy
    if not isinstance(policy, LocalRoots | BucketPrefixes | PublicRepos):
        # None (or a kind without logic here): the engine and the CLI take it; the service cannot confine it.
        raise PolicyError(field, f"{scheme.name}:// URIs are not served by this server")
    if output and not scheme.writable:
        raise PolicyError(field, f"outputs go to {schemes.prefixes(writable=True)}")
    if isinstance(policy, LocalRoots):
        _check_file(loc, parts.path, field, scope)
    elif isinstance(policy, BucketPrefixes):
        _check_bucket(loc, field, scope, output)
    elif isinstance(policy, PublicRepos):
        _check_repo(loc, field, settings, policy)
    return loc


def check_output_placement(loc: Location, field: str, settings: Settings, *, tenant: str | None = None,
                           itself: bool = True) -> None:
    """Refuse an output placed in a model's directory, a published result or an output being written: at or
    under a directory or prefix that directly holds config.json, a safetensors index, *.safetensors,
    graft-manifest.json or a sink's in-progress marker (S3's claim, a local output's staging directory beside
    it), or one whose path runs through an existing file. The walk goes up to the outermost allowed root
    (LocalRoots schemes; above it only for a manifest, as before) or the container's root (BucketPrefixes).
    `itself=False` leaves the output location's own contents to the sink: a worker's retry finds its earlier
    attempt's files and claim there. Touches storage: call it off the event loop."""
    policy = _policy(loc)
    if isinstance(policy, LocalRoots):
        _check_local_placement(loc, field, scope_for(tenant, settings), itself)
    elif isinstance(policy, BucketPrefixes):
        listing = schemes.get(loc.scheme).listing(settings.s3_endpoint_url, settings.storage_timeout_seconds)
        _check_bucket_placement(loc, field, listing, itself)


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


def _check_bucket_placement(loc: Location, field: str, listing: Listing, itself: bool) -> None:
    parts = loc.prefix.split("/")
    # (the directory's prefix, the name below it the output's path continues through), deepest first
    levels = [("/".join(parts[:depth]) + "/" if depth else "", parts[depth] if depth < len(parts) else None)
              for depth in range(len(parts), -1, -1)]
    top = f"{loc.scheme}://{loc.bucket}"
    for directory, child in levels if itself else levels[1:]:
        names, known = _bucket_listing(listing, loc.bucket, directory, field)

        def exists(name: str, directory: str = directory) -> bool:
            return _ask(field, lambda: listing.exists(loc.bucket, directory + name))

        marker = _strongest(names, lambda n, known=known: not known(n), exists)
        where = f"{top}/{directory.rstrip('/')}" if directory else top
        if marker is not None:
            raise _refuse_placement(field, where, marker)
        if child is not None and (child in names or (not known(child) and exists(child))):
            raise PolicyError(field, f"runs through an existing object ({top}/{directory}{child}); choose a prefix")


def _bucket_listing(listing: Listing, bucket: str, directory: str,
                    field: str) -> tuple[set[str], Callable[[str], bool]]:
    """The names of the objects directly under `directory` that one page of LISTING_PAGE entries holds, and
    which names that listing answers for (absent from the names: not there). Past a full page, one more
    page of the names starting with SHARD_PREFIX, so that a directory of shards alone is still found."""
    def page(prefix: str) -> tuple[set[str], str | None]:
        """(names, the last entry reached where the page was full; None where the listing was all)."""
        answer = _ask(field, lambda: listing.page(bucket, prefix, LISTING_PAGE))
        if answer is None:  # nothing is stored there; the sink reports the container
            return set(), None
        keys = [key[len(directory):] for key in answer.keys]
        entries = keys + [p[len(directory):] for p in answer.prefixes]
        return set(keys), (max(entries) if answer.truncated and entries else None)

    names, last = page(directory)
    if last is None:
        return names, lambda name: True
    # Keys list in byte order: every name up to `last` was on the page, shards included where it went past them.
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


def _ask(field: str, request: Callable[[], T]) -> T:
    """One storage request of the placement check: any failure is the storage's, worth a retry (the API
    answers 503, the worker retries)."""
    try:
        return request()
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
