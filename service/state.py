"""What the API process holds while it runs: settings, Redis clients, the job store, the RQ queue,
the results storage.

Built in the app's lifespan (`open_state`) and reached from routes with `get_state(request)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from fastapi import Request
from rq import Queue

from contract.request import Limits
from contract.storage import Storage
from contract.store import AsyncJobStore

from .settings import ServiceSettings


@dataclass
class AppState:
    settings: ServiceSettings
    limits: Limits
    redis: aredis.Redis  # async pool: records, events, metrics
    sync_redis: redis.Redis  # RQ needs a synchronous connection (used from a thread)
    store: AsyncJobStore
    queue: Queue
    storage: Storage  # results: the folder DATA_DIR or object storage (blocking: use a thread)

    def prime(self) -> None:
        """Cache what RQ asks Redis once per queue (its server version), so that recording an
        enqueue (`submit.rq_commands`) never touches the network. Blocking: run in a thread."""
        self.queue.get_redis_server_version()

    async def close(self) -> None:
        await self.redis.aclose()
        self.sync_redis.close()


def open_state(settings: ServiceSettings) -> AppState:
    pool = aredis.ConnectionPool.from_url(
        settings.REDIS_URL, max_connections=settings.REDIS_MAX_CONNECTIONS
    )
    client = aredis.Redis(connection_pool=pool)
    sync_client = redis.Redis.from_url(settings.REDIS_URL)
    return AppState(
        settings=settings,
        limits=settings.limits(),
        redis=client,
        sync_redis=sync_client,
        store=AsyncJobStore(client, retention_s=settings.RETENTION_S),
        queue=Queue(settings.QUEUE_NAME, connection=sync_client),
        storage=settings.open_storage(),
    )


def get_state(request: Request) -> AppState:
    return request.app.state.vmoba
