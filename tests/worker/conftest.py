"""Fixtures of the worker tests: a warm tiny-model runtime shared by the session, and worker
processes started for real (stopped at the end of each test). Helpers live in
`worker_helpers.py`."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from worker_helpers import Proc, configure, worker_env


@pytest.fixture(scope="session")
def tiny_runtime(redis_url, tmp_path_factory):
    """One warm tiny-model runtime for the session (loading takes a few seconds)."""
    from worker.runtime import Runtime
    from worker.settings import WorkerSettings

    data = tmp_path_factory.mktemp("data")
    settings = WorkerSettings(**worker_env(redis_url, data, WORKER_NAME="pytest-worker"))
    return Runtime.load(settings)


@pytest.fixture
def rt(tiny_runtime, redis_client, tmp_path):
    """The session runtime with fresh settings, storage and state for one test (Redis flushed).

    Change `rt.settings` with `configure(rt, NAME=value, ...)`.
    """
    from worker import runtime as runtime_mod
    from worker.storage import ResultStorage

    configure(tiny_runtime, DATA_DIR=tmp_path / "data")
    tiny_runtime.storage = ResultStorage(tmp_path / "data")
    tiny_runtime.current = None
    tiny_runtime.stop_requested_at = None
    tiny_runtime.restart_reason = None
    speed = dataclasses.replace(tiny_runtime.speed)
    runtime_mod.install(tiny_runtime)
    yield tiny_runtime
    runtime_mod.install(None)
    tiny_runtime.speed = speed  # a test's jobs must not change the next test's timeouts


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(module, env, log_path):
        p = Proc(module, env, log_path)
        started.append(p)
        return p

    yield start
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            p.stop()
