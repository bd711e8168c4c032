"""API keys -> tenants. Keys are hashed on load; only their sha256 is kept in memory."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .problems import Problem

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`; keys map to tenants")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(spec: str) -> dict[str, str]:
    """`key:tenant,key2:tenant2` -> {sha256(key): tenant}."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in spec.split(",")):
        if not pair:
            continue
        key, sep, tenant = pair.rpartition(":")
        if not sep or not key or not tenant:
            raise ValueError("GRAFT_API_KEYS must be comma-separated key:tenant pairs")
        out[digest(key)] = tenant
    return out


def dev_key() -> str:
    return "gk_dev_" + secrets.token_urlsafe(24)


UNAUTHORIZED = Problem(401, "unauthorized", "a valid `Authorization: Bearer <key>` header is required",
                       headers={"WWW-Authenticate": "Bearer"})


def tenant_of(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """FastAPI dependency: the caller's tenant (401 otherwise)."""
    if creds is None or not creds.credentials:
        raise UNAUTHORIZED
    tenant = request.app.state.keys.get(digest(creds.credentials.strip()))
    if tenant is None:
        raise UNAUTHORIZED
    return tenant
