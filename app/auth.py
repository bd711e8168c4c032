"""API keys -> tenants. Keys are hashed on load; only their sha256 is kept in memory.

The key is checked by `Gate`, an ASGI middleware, before a body is read: an anonymous caller gets 401 whatever
it sent (a malformed or oversized body included) and learns nothing about the routes or their validation.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from worker.service.uri_policy import TENANT_NAME

from .problems import problem_response

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`; keys map to tenants")
PROTECTED = "/v1/"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(spec: str) -> dict[str, str]:
    """`key:tenant,key2:tenant2` -> {sha256(key): tenant}. Tenant names become path segments of the default
    output namespace, so they are restricted to letters, digits, `_`, `.` and `-`."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in spec.split(",")):
        if not pair:
            continue
        key, sep, tenant = pair.rpartition(":")
        if not sep or not key or not tenant:
            raise ValueError("GRAFT_API_KEYS must be comma-separated key:tenant pairs")
        if not TENANT_NAME.match(tenant):
            raise ValueError(f"GRAFT_API_KEYS: tenant {tenant!r} must match {TENANT_NAME.pattern}")
        out[digest(key)] = tenant
    return out


def dev_key() -> str:
    return "gk_dev_" + secrets.token_urlsafe(24)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class Gate:
    """Pure ASGI middleware for /v1/: the API key first (401), then the body size (413), before any body byte
    is read. A body without Content-Length is counted as it streams in."""

    def __init__(self, app, keys: dict[str, str], max_body_bytes: int) -> None:
        self.app, self.keys, self.max_body = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        token = _bearer(scope["headers"])
        tenant = self.keys.get(digest(token)) if token else None
        if tenant is None:
            resp = problem_response(401, "unauthorized", "a valid `Authorization: Bearer <key>` header is required",
                                    instance=scope["path"], headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            resp = problem_response(413, "body_too_large", f"the body exceeds {self.max_body} bytes",
                                    instance=scope["path"])
            return await resp(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # FastAPI re-raises an HTTPException met while reading the body; our handler renders it.
                    raise HTTPException(413, f"the body exceeds {self.max_body} bytes")
            return message

        return await self.app(scope, counted, send)


async def tenant_of(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """FastAPI dependency: the caller's tenant, set by Gate (`creds` declares the scheme in the OpenAPI).
    Async: a sync dependency would cost every request a hop through the thread pool."""
    return request.state.tenant
