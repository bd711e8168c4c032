"""file:// and bare paths: model directories and outputs on this machine (storage/local_files.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import ParseResult, unquote

from worker.engine.errors import GraftError
from worker.engine.storage.schemes.base import Access, LocalRoots, Scheme
from worker.engine.storage.uris import Location

if TYPE_CHECKING:
    from worker.engine.storage.sinks import Sink
    from worker.engine.storage.stores import Store


class LocalScheme(Scheme):
    name = "file"
    example = "file:///abs/path"
    writable = True
    policy = LocalRoots()

    def parse_bare(self, path: str) -> Location:
        """A reference without a scheme: a path, relative to the working directory."""
        return Location("file", path=os.path.abspath(os.path.expanduser(path)))

    def parse(self, uri: str, parsed: ParseResult, field: str) -> Location:
        if parsed.netloc not in ("", "localhost"):
            raise GraftError("invalid_uri", f"{field}: file URIs name no host: {uri}")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise GraftError("invalid_uri", f"{field}: file URI must be absolute: {uri}")
        return Location("file", path=os.path.normpath(path))

    def render(self, location: Location) -> str:
        return f"file://{location.path}"

    def child(self, location: Location, name: str) -> Location:
        return Location("file", path=os.path.join(location.path, name))

    def open_store(self, location: Location, access: Access) -> Store:
        from worker.engine.storage.local_files import LocalStore
        from worker.engine.storage.stores import Confinement

        return LocalStore(location, Confinement.of(access.allowed_roots, access.denied_roots))

    def open_sink(self, location: Location, access: Access) -> Sink:
        from worker.engine.storage.local_files import LocalSink
        from worker.engine.storage.stores import Confinement

        return LocalSink(location, Confinement.of(access.allowed_roots, access.denied_roots),
                         manifest_name=access.manifest_name, writer=access.writer, split=access.split)

    def remove(self, location: Location, names: list[str], access: Access) -> None:
        from worker.engine.storage.local_files import remove_files
        from worker.engine.storage.stores import Confinement

        remove_files(location, names, Confinement.of(access.allowed_roots, access.denied_roots))

    def ready(self, location: Location, endpoint_url: str | None) -> str:
        os.makedirs(location.path, exist_ok=True)
        return "ok" if os.access(location.path, os.W_OK) else "error: not writable"


SCHEME = LocalScheme()
