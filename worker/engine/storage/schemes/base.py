"""What a storage scheme is: the URI form it parses, the store and sink it opens, how its client library
reports failures, and the data the service's URI policy reads to confine it.

A scheme module stays light to import (the API process parses and checks URIs with it): its store, its sink
and its client library are imported by the methods that open them. The policy's logic is the service's
(worker/service/uri_policy.py); a scheme only declares which kind of confinement applies to it, as data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import ParseResult

from worker.engine.errors import GraftError

if TYPE_CHECKING:
    from worker.engine.storage.faults import StorageRetry
    from worker.engine.storage.lanes import RemoteReads
    from worker.engine.storage.sinks import Sink
    from worker.engine.storage.stores import Store
    from worker.engine.storage.uris import Location


# --- How the service confines a scheme (read by worker/service/uri_policy.py) ---

@dataclass(frozen=True)
class LocalRoots:
    """Paths on this machine (Location.path), confined to directories: GRAFT_ALLOWED_ROOTS, the tenant's
    grants and its own output namespace, judged on real paths; the engine checks every file it opens again."""


@dataclass(frozen=True)
class BucketPrefixes:
    """Objects in containers under key prefixes (Location.bucket, .prefix): the containers the Settings field
    `allowlist` lists (comma-separated; empty: any the configured credentials reach), the tenant's
    (container, prefix) grants and its own output namespace. The URI names no endpoint; keys list in byte
    order, one level at a time (the output placement check relies on both)."""

    allowlist: str = ""


@dataclass(frozen=True)
class PublicRepos:
    """Read-only repositories (Location.repo) any tenant may name while the Settings field `enabled_by` is
    true; no grants."""

    enabled_by: str


Policy = LocalRoots | BucketPrefixes | PublicRepos


# --- How a scheme's client library reports failures (read by faults.classify) ---

def _no_code(exc: BaseException) -> str:
    return ""


def _no_status(exc: BaseException) -> int | None:
    return None


def _never(exc: BaseException) -> bool:
    return False


@dataclass(frozen=True)
class Faults:
    """What faults.classify needs to know about one library's exceptions: its error codes by meaning and
    predicates on them. A predicate looks only at classes of modules already imported (an exception of a
    library nobody loaded cannot exist), so classifying imports nothing."""

    transient_codes: frozenset[str] = frozenset()  # an overloaded or briefly unwell service: try again
    not_found_codes: frozenset[str] = frozenset()
    denied_codes: frozenset[str] = frozenset()
    final_codes: frozenset[str] = frozenset()  # a storage_error that trying the same call again cannot cure
    error_code: Callable[[BaseException], str] = _no_code
    http_status: Callable[[BaseException], int | None] = _no_status
    transport: Callable[[BaseException], bool] = _never  # a connection failed, closed, reset or timed out
    no_credentials: Callable[[BaseException], bool] = _never  # refused by the client before any request
    client_error: Callable[[BaseException], bool] = _never  # any other failure of the library: not retried


# --- How the engine reaches storage ---

@dataclass(frozen=True)
class Access:
    """What open_store and open_sink were given: the S3-compatible endpoint, the retry budget, the local
    confinement (None: unconfined), how remote inputs are read and how outputs are uploaded."""

    endpoint_url: str | None = None
    retry: StorageRetry | None = None
    allowed_roots: list[str] | None = None
    denied_roots: list[str] | None = None
    reads: RemoteReads | None = None
    part_bytes: int = 8 << 20
    parts_in_flight: int = 16
    writer: str | None = None
    manifest_name: str | None = None  # the file committed last (None: a graft's graft-manifest.json)
    # A graft split into tasks (pipeline/shards.py): the task that planned it claims the output; shard and finalize
    # tasks join that claim (same writer), writing their files without clearing or claiming anything.
    split: str = ""  # "" (a graft of one task), "claim" (the planning task) or "join" (a shard or finalize task)


@dataclass(frozen=True)
class Page:
    """One page of a container's listing below a prefix, one level deep: the full keys of the objects and
    the sub-prefixes, and whether more entries follow."""

    keys: list[str]
    prefixes: list[str]
    truncated: bool


class Listing:
    """The two questions the output placement check asks a BucketPrefixes scheme."""

    def page(self, bucket: str, prefix: str, limit: int) -> Page | None:
        """At most `limit` entries directly under `prefix`, in byte order; None where the container does not
        exist. Failures raise (the check reports them as the storage's)."""
        raise NotImplementedError

    def exists(self, bucket: str, key: str) -> bool:
        raise NotImplementedError


class Scheme:
    """One row of the table (schemes/__init__.py). `example` shows the form in messages; `writable`: outputs
    may go there; `hostless`: its URIs name no host, port or credentials (the endpoint is configured);
    `policy`: how the service confines it (None: the service refuses it, the engine and the CLI take it);
    `upload_parts`: an output there holds its upload's parts in memory (the estimates count them)."""

    name: ClassVar[str]
    example: ClassVar[str]
    writable: ClassVar[bool] = False
    hostless: ClassVar[bool] = True
    policy: ClassVar[Policy | None] = None
    faults: ClassVar[Faults] = Faults()
    upload_parts: ClassVar[bool] = False

    def parse_bare(self, text: str) -> Location:
        """The location a reference without "://" names, for the scheme registered as schemes.BARE."""
        raise NotImplementedError

    def parse(self, uri: str, parsed: ParseResult, field: str) -> Location:
        """The location `uri` names (`parsed`: urlparse's reading of it); GraftError("invalid_uri") if none."""
        raise NotImplementedError

    def render(self, location: Location) -> str:
        """The URI of `location`, which parse reads back as the same location."""
        raise NotImplementedError

    def child(self, location: Location, name: str) -> Location:
        """A sub-directory (default per-job output prefixes)."""
        raise GraftError("invalid_uri", f"cannot write under {location}")

    def pinned(self, location: Location, revision: str | None) -> Location:
        """The location at the revision its store resolved (where a name such as `main` may move)."""
        return location

    def open_store(self, location: Location, access: Access) -> Store:
        raise NotImplementedError

    def open_sink(self, location: Location, access: Access) -> Sink:
        from worker.engine.storage import schemes

        raise GraftError("invalid_uri", f"{location}: outputs go to {schemes.prefixes(writable=True)}")

    def ready(self, location: Location, endpoint_url: str | None) -> str:
        """'ok' when an output at `location` could be written now (the readiness probe), else why not."""
        return f"error: {self.name}:// takes no outputs"

    def listing(self, endpoint_url: str | None, timeout: float) -> Listing:
        """A BucketPrefixes scheme's listing, for the output placement check."""
        raise NotImplementedError

    def remove(self, location: Location, names: list[str], access: Access) -> None:
        """Remove the files `names` (plain names, directly under `location`) of a published output, one after
        the other in the order given (the caller puts the manifest first: from then on no reader takes what is
        left for a whole result), then the output's directory where the scheme has them and it is empty. A name
        already gone is no error, so an interrupted removal is finished by calling it again; nothing else under
        `location` is touched. GraftError (storage_error and the like) when the storage refuses."""
        raise GraftError("invalid_uri", f"{location}: {self.name}:// outputs cannot be removed")
