"""What the routes share: built once by create_app, handed to handlers as a dependency."""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from fastapi import Request
from prometheus_client import CollectorRegistry

from worker.service.job_store import JobStore
from worker.service.settings import Settings

from .limits import TenantLimits
from .preview import PreviewPool


@dataclass
class AppState:
    settings: Settings
    keys: dict[str, str]
    redis: redis.Redis
    aredis: aioredis.Redis
    store: JobStore
    registry: CollectorRegistry
    limits: TenantLimits
    previews: PreviewPool

    def close(self) -> None:
        self.previews.close()
        self.redis.close()


async def app_state(request: Request) -> AppState:
    """Async on purpose: no thread-pool hop for a lookup (see auth.tenant_of)."""
    return request.app.state.graft
