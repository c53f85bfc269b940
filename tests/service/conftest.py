"""Fixtures for the API tests: a real uvicorn serving `service.app` on a free port, on the
session's private redis-server, with a fresh DATA_DIR. No workers: tests play the worker's part
through `contract.store.JobStore` where they need one."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import redis
import uvicorn

from contract.store import JobStore
from service.app import create_app
from service.serve import free_port
from service.settings import ServiceSettings


class LiveServer:
    """`service.app` under a real uvicorn in a background thread."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            loop="asyncio",
            http="service.http:HeaderTimeoutProtocol",  # as make serve runs it
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def make_server(redis_url, redis_client, tmp_path):
    """`make_server(**settings)` -> a started `LiveServer` (stopped after the test)."""
    servers = []

    def make(**overrides) -> LiveServer:
        values = dict(
            REDIS_URL=redis_url,
            DATA_DIR=tmp_path / "data",
            MODEL="tiny",
            POLL_AFTER_MS=50,
            SSE_PING_S=0.5,
        )
        values.update(overrides)
        server = LiveServer(ServiceSettings(**values)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def shared_server(redis_url, tmp_path_factory):
    """One server for a whole module of stateless tests (validation)."""
    server = LiveServer(
        ServiceSettings(REDIS_URL=redis_url, MODEL="tiny", DATA_DIR=tmp_path_factory.mktemp("data"))
    ).start()
    yield server
    server.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
def store(redis_url, redis_client):
    """The worker's side of the job records (sync client on the same Redis)."""
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, retention_s=3600)
    client.close()


@pytest.fixture
def run_job(store):
    """`run_job(settings, job_id, video=None, steps=3)`: play the worker for one queued job."""

    def run(settings, job_id, **kw):
        return _run_job(store, settings, job_id, **kw)

    return run


def _run_job(
    store: JobStore,
    settings,
    job_id: str,
    *,
    video: bytes | None = None,
    steps: int = 3,
    density: float = 0.3,
) -> bytes:
    """Take a queued job through started, progress, decode, encode and completed, writing
    `video.mp4` (random bytes unless given) and a thumbnail. Returns the video bytes."""
    video = os.urandom(50_000) if video is None else video
    assert store.mark_started(job_id, worker="test-worker")
    for step in range(1, steps + 1):
        assert store.mark_progress(job_id, step, steps)
    store.mark_stage(job_id, "decoding")
    store.mark_stage(job_id, "encoding")
    d = settings.job_dir(job_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / "video.mp4").write_bytes(video)
    (d / "thumbnail.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
    (d / "meta.json").write_text("{}")
    assert store.mark_completed(
        job_id,
        files=["video.mp4", "thumbnail.jpg", "meta.json"],
        timings={"denoising_s": 0.3, "decoding_s": 0.1, "encoding_s": 0.05, "total_s": 0.5},
        density=density,
    )
    return video
