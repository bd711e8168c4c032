"""Packages whose names load on first use: the API process imports them (options, specs, verdicts) and must
not pay for torch, which the modules behind most names import."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: name -> the submodule that defines it, imported when asked for
    and then kept in the package's namespace."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # A dotted path from the root is another package's module (the verdict rules live below the checks).
        source = import_module(module) if module.startswith("worker.") else import_module(f".{module}", package)
        value = getattr(source, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
