"""`graft serve`: one uvicorn process running the API."""

from __future__ import annotations

import uvicorn


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    from .main import app_from_env

    app = app_from_env()  # refuses to start without API keys, unless GRAFT_DEV_MODE
    kwargs = {}
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:
        pass
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", **kwargs)
