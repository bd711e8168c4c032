"""hf://org/name[@revision]: a Hugging Face hub repository, read only (storage/hub_store.py reads it)."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING
from urllib.parse import ParseResult

from worker.engine.errors import GraftError
from worker.engine.storage.schemes.base import Access, Faults, PublicRepos, Scheme
from worker.engine.storage.uris import Location

if TYPE_CHECKING:
    from worker.engine.storage.stores import Store

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _http_status(exc: BaseException) -> int | None:
    """The status of the response an httpx (huggingface_hub) error carries."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return int(status) if isinstance(status, int) else None


def _transport(exc: BaseException) -> bool:
    for module in ("httpx", "httpx2"):  # huggingface_hub uses one or the other, depending on its version
        mod = sys.modules.get(module)
        transport = getattr(mod, "TransportError", None) if mod is not None else None
        if transport is not None and isinstance(exc, transport):
            return True
    return False


class HubScheme(Scheme):
    name = "hf"
    example = "hf://org/name[@rev]"
    hostless = False  # `org@revision` reads as user@host
    policy = PublicRepos(enabled_by="hf_enabled")
    faults = Faults(http_status=_http_status, transport=_transport)

    def parse(self, uri: str, parsed: ParseResult, field: str) -> Location:
        rest = uri[len("hf://"):]
        repo, _, revision = rest.partition("@")
        repo = repo.strip("/")
        if not _HF_REPO.match(repo):
            raise GraftError("invalid_uri", f"{field}: not a hub repository id: {uri}")
        return Location("hf", repo=repo, revision=revision or None)

    def render(self, location: Location) -> str:
        rev = f"@{location.revision}" if location.revision else ""
        return f"hf://{location.repo}{rev}"

    def pinned(self, location: Location, revision: str | None) -> Location:
        return dataclasses.replace(location, revision=revision) if revision else location

    def open_store(self, location: Location, access: Access) -> Store:
        from worker.engine.storage.hub_store import HubStore

        return HubStore(location, access.retry, access.reads)


SCHEME = HubScheme()
