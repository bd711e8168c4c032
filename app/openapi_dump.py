"""Write openapi.yaml from the app: `python -m app.openapi_dump [path]` (a test fails when they drift)."""

from __future__ import annotations

import sys

import yaml

from worker.service.settings import Settings

from .main import create_app


def spec() -> dict:
    # Any key will do: the schema does not depend on configuration.
    return create_app(Settings(api_keys="schema:schema", dev_mode=False)).openapi()


def main(path: str = "openapi.yaml") -> None:
    with open(path, "w") as fh:
        fh.write("# Generated from the FastAPI app by `python -m app.openapi_dump`; the contract of /v1.\n")
        yaml.safe_dump(spec(), fh, sort_keys=False, allow_unicode=True, width=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
