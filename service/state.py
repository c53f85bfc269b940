"""What the API process holds while it runs: settings, Redis clients, the job store, the served
models with their limits and RQ queues, the results storage.

Built in the app's lifespan (`open_state`) and reached from routes with `get_state(request)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aredis
from fastapi import Request
from redis import Redis as SyncRedis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue

from contract.enqueue import queue_name
from contract.models import REGISTRY, ModelSpec, resolve_model_id
from contract.request import Limits
from contract.storage import Storage
from contract.store import AsyncJobStore

from .errors import APIError
from .settings import ServiceSettings


@dataclass
class AppState:
    settings: ServiceSettings
    models: dict[str, ModelSpec]  # configured (`MODEL`), in order: the first is the default
    redis: aredis.Redis  # async pool: records, events, metrics
    sync_redis: SyncRedis  # RQ needs a synchronous connection (used from a thread)
    store: AsyncJobStore
    storage: Storage  # results: the folder DATA_DIR or object storage (blocking: use a thread)
    _limits: dict[str, Limits] = field(default_factory=dict)
    _queues: dict[str, Queue] = field(default_factory=dict)

    @property
    def default_model(self) -> ModelSpec:
        return next(iter(self.models.values()))

    def limits(self, spec: ModelSpec) -> Limits:
        if spec.id not in self._limits:
            self._limits[spec.id] = self.settings.limits_for(spec)
        return self._limits[spec.id]

    def queue(self, model_id: str) -> Queue:
        """The RQ queue of a model (workers listen to the queues of the models they loaded)."""
        if model_id not in self._queues:
            name = queue_name(self.settings.QUEUE_NAME, model_id)
            self._queues[model_id] = Queue(name, connection=self.sync_redis)
        return self._queues[model_id]

    def known_model(self, name: object, live: list[dict]) -> ModelSpec:
        """The spec a request's `model` names: a configured or registry model, or one a live
        worker advertises; `APIError` 400 listing the known ones otherwise."""
        if name is None or name == "":
            return self.default_model
        text = str(name)
        if text in self.models:
            return self.models[text]
        model_id = resolve_model_id(text)
        if model_id is not None:
            return self.models.get(model_id, REGISTRY[model_id])
        for info in live:
            for spec in info.get("model_specs") or ():
                if spec.get("id") == text:
                    return self._advertised(spec)
        known = sorted({*self.models, *REGISTRY})
        raise APIError(
            400,
            f"model {text[:100]!r} is unknown; known models: {', '.join(known)} "
            "(GET /models lists the served ones)",
            param="model",
            code="model_not_found",
        )

    def _advertised(self, info: dict) -> ModelSpec:
        """A custom model (outside the registry) that a live worker serves."""
        from contract.models import custom_model

        return custom_model(
            info["id"],
            info.get("base") or self.settings.MODEL_BASE,
            vmoba_trained=bool(info.get("vmoba_trained")),
        )

    def prime(self) -> None:
        """Cache what RQ asks Redis once per queue (its server version), so that recording an
        enqueue (`submit.rq_commands`) never touches the network. Blocking: run in a thread."""
        self.queue(self.default_model.id).get_redis_server_version()

    async def close(self) -> None:
        await self.redis.aclose()
        self.sync_redis.close()


def open_state(settings: ServiceSettings) -> AppState:
    # After a Redis restart every pooled connection is stale: each is pinged before use when idle
    # for a second and reconnected (retried once more on a connection error), so a restart costs
    # the seconds Redis is down, not a 503 per stale connection for minutes.
    pool = aredis.ConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        health_check_interval=1,
        socket_connect_timeout=2,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    client = aredis.Redis(connection_pool=pool)
    sync_client = SyncRedis.from_url(settings.REDIS_URL)
    return AppState(
        settings=settings,
        models={spec.id: spec for spec in settings.models()},
        redis=client,
        sync_redis=sync_client,
        store=AsyncJobStore(client, retention_s=settings.RETENTION_S),
        storage=settings.open_storage(),
    )


def get_state(request: Request) -> AppState:
    return request.app.state.vmoba
