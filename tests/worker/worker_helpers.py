"""Helpers of the worker tests (used by the tests and by `conftest.py`): the test worker's
environment, job submission as the API does it, an in-process RQ worker, and worker processes
started for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env(redis_url: str, data_dir, **extra) -> dict:
    """Environment of a test worker: tiny model, fast heartbeats, test hooks on."""
    env = {
        "REDIS_URL": redis_url,
        "DATA_DIR": str(data_dir),
        "MODEL": "tiny",
        "WORKER_DEVICE": "cpu",
        "ENABLE_TEST_HOOKS": "1",
        "WARMUP_STEPS": "1",
        "HEARTBEAT_INTERVAL_S": "0.5",
        "HEARTBEAT_TTL_S": "3",
        "JANITOR_INTERVAL_S": "1",
        "RESTART_BACKOFF_MAX_S": "1",
        "LOG_LEVEL": "INFO",
        "ENCODE_PRESET": "ultrafast",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def configure(rt, **changes):
    from worker.settings import WorkerSettings

    env = worker_env(
        rt.settings.REDIS_URL, changes.pop("DATA_DIR", rt.settings.DATA_DIR), WORKER_NAME=rt.name
    )
    env.update(
        {
            k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v)
            for k, v in changes.items()
        }
    )
    rt.settings = WorkerSettings(**env)
    rt.store.retention_s = rt.settings.RETENTION_S
    return rt.settings


def submit(
    redis_client,
    *,
    test_hooks=None,
    queue="vmoba:tiny-wan2.1-t2v",
    job_timeout=3600,
    raw=None,
    **body,
):
    """Create the record and enqueue the RQ job the way the API does; returns the job id.

    `raw` replaces the payload after the record is made (to send what validation would refuse).
    """
    from rq import Queue

    from contract.enqueue import JOB_FUNCTION
    from contract.keys import new_job_id
    from contract.request import GenerateRequest, Limits
    from contract.store import JobStore

    body.setdefault("prompt", "a red ball on a wooden floor")
    body.setdefault("num_frames", 5)
    body.setdefault("width", 32)
    body.setdefault("height", 32)
    body.setdefault("num_inference_steps", 2)
    model = body.pop("model", "tiny-wan2.1-t2v")
    task = body.pop("task", "t2v")
    request = GenerateRequest.model_validate(body, context={"limits": Limits()}).validated(
        seed=body.get("seed", 0), model=model, task=task
    )
    job_id = new_job_id()
    JobStore(redis_client).create(
        request.model_dump(mode="json"), model=model, seed=request.seed, job_id=job_id
    )
    payload = request.to_payload(job_id) if raw is None else {**raw, "job_id": job_id}
    if test_hooks:
        payload["_test"] = test_hooks
    Queue(queue, connection=redis_client).enqueue(
        JOB_FUNCTION, payload, job_id=job_id, job_timeout=job_timeout, result_ttl=600
    )
    return job_id


def run_worker(rt, *, burst=True):
    """Run a `GenerationWorker` in this process until the queue is empty (or it stops)."""
    from worker.run import GenerationWorker

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = GenerationWorker(
        rt.settings.queues, connection=rt.redis, name=f"{rt.name}-{time.time_ns()}", runtime=rt
    )
    rt.name = worker.name  # records say which worker ran them
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return worker


def events(redis_client, job_id):
    from contract.store import JobStore

    return JobStore(redis_client).events_since(job_id)


def wait_for(predicate, timeout_s=30.0, interval_s=0.05, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Proc:
    """A worker process (`python -m worker` or `python -m worker.run`) with its log."""

    def __init__(self, module: str, env: dict, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - open for the child's whole life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s=30):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def live_worker(store, predicate=lambda info: True, timeout_s=90):
    return wait_for(
        lambda: next((w for w in store.live_workers() if predicate(w)), None),
        timeout_s=timeout_s,
        interval_s=0.1,
        what="a live worker",
    )


def wait_status(store, job_id, statuses, timeout_s=60):
    return wait_for(
        lambda: (r := store.get(job_id)) is not None and r.status in statuses and r,
        timeout_s=timeout_s,
        interval_s=0.05,
        what=f"job {job_id} to be {statuses}",
    )
