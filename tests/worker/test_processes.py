"""Worker processes for real (`python -m worker`, `python -m worker.run`) with the tiny model:
`kill -9` mid-job, an injected CUDA OOM that restarts the worker, SIGTERM to the launcher."""

from __future__ import annotations

import os
import signal
import time

import pytest
from worker_helpers import events, live_worker, submit, wait_for, wait_status, worker_env

from contract.store import JobStore

pytestmark = pytest.mark.timeout(180)


def test_kill_9_mid_job_the_launcher_retries_it_on_a_new_worker(
    redis_url, redis_client, tmp_path, procs
):
    store = JobStore(redis_client)
    launcher = procs(
        "worker",
        worker_env(redis_url, tmp_path / "data", LOST_JOB_RETRIES=1),
        tmp_path / "launcher.log",
    )
    first = live_worker(store)
    job_id = submit(redis_client, num_inference_steps=8, test_hooks={"step_delay_s": 0.3})
    wait_for(lambda: (store.get(job_id).step or 0) >= 2, what="step 2")
    os.kill(first["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: "requeued" in [e["type"] for e in events(redis_client, job_id)],
        timeout_s=10,
        what="the job to be re-queued",
    )
    assert time.monotonic() - killed_at < 5  # the launcher saw the death: no heartbeat wait
    rec = wait_status(store, job_id, ("completed", "failed"))
    assert (rec.status, rec.attempts) == ("completed", 2), launcher.text()[-3000:]
    assert rec.worker != first["name"]
    assert "signal SIGKILL" in launcher.text()


def test_an_idle_worker_picks_up_a_new_job_at_once(redis_url, redis_client, tmp_path, procs):
    """Idle past the Redis client's default 5 s socket timeout, the worker still takes a job at once
    (regression: RQ's blocking dequeue timed out, backed off, and started jobs up to a minute late)."""
    env = worker_env(redis_url, tmp_path / "data", WORKER_NAME="idle-worker")
    worker = procs("worker.run", env, tmp_path / "worker.log")
    store = JobStore(redis_client)
    live_worker(store, lambda w: w["name"] == "idle-worker")
    time.sleep(8)
    job_id = submit(redis_client, num_inference_steps=2)
    submitted = time.monotonic()
    wait_status(store, job_id, ("in_progress", "completed"), timeout_s=30)
    assert time.monotonic() - submitted < 2.5, worker.text()[-2000:]
    assert "could not connect to Redis" not in worker.text()


def test_kill_9_without_a_launcher_is_found_by_its_heartbeat(
    redis_url, redis_client, tmp_path, procs
):
    from worker.janitor import Janitor
    from worker.settings import WorkerSettings

    env = worker_env(
        redis_url,
        tmp_path / "data",
        HEARTBEAT_TTL_S=2,
        LOST_JOB_RETRIES=0,
        WORKER_NAME="lonely-worker",
    )
    worker = procs("worker.run", env, tmp_path / "worker.log")
    live_worker(JobStore(redis_client), lambda w: w["name"] == "lonely-worker")
    janitor = Janitor.from_settings(WorkerSettings(**env))
    store = janitor.store
    job_id = submit(redis_client, num_inference_steps=8, test_hooks={"step_delay_s": 0.3})
    wait_for(lambda: (store.get(job_id).step or 0) >= 1, what="step 1")
    os.kill(worker.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert janitor.sweep().lost == []  # the heartbeat has not run out yet: maybe just slow
    wait_for(
        lambda: janitor.sweep().lost == [job_id],
        timeout_s=10,
        interval_s=0.2,
        what="the janitor to see the dead worker",
    )
    assert time.monotonic() - killed_at <= 2 + 1.5  # within the heartbeat TTL (+ one beat)
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "worker_lost")
    assert "lonely-worker" in rec.error_message


def test_oom_restarts_the_worker_the_next_job_runs_and_sigterm_lets_the_last_finish(
    redis_url, redis_client, tmp_path, procs
):
    store = JobStore(redis_client)
    launcher = procs(
        "worker",
        worker_env(redis_url, tmp_path / "data", STOP_GRACE_S=600),
        tmp_path / "launcher.log",
    )
    first = live_worker(store)
    oom = submit(
        redis_client,
        num_frames=9,
        width=64,
        height=32,
        num_inference_steps=3,
        test_hooks={"oom_at_step": 1},
    )
    nxt = submit(redis_client)
    rec = wait_status(store, oom, ("failed", "completed"))
    assert rec.error_code == "gpu_oom" and "9 frames at 64x32" in rec.error_message
    rec = wait_status(store, nxt, ("failed", "completed"))
    assert rec.status == "completed", launcher.text()[-3000:]
    assert rec.worker != first["name"]  # ran on the fresh process
    assert "exit code 75" in launcher.text()

    # SIGTERM to the launcher mid-job: the job finishes (it ends within STOP_GRACE_S), then
    # everything exits cleanly and nothing else is taken.
    last = submit(redis_client, num_inference_steps=6, test_hooks={"step_delay_s": 0.2})
    after = submit(redis_client)
    wait_for(lambda: (store.get(last).step or 0) >= 2, what="step 2")
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(60) == 0
    assert store.get(last).status == "completed"
    assert store.get(after).status == "queued"
    assert store.live_workers() == []


def test_watchdog_fails_a_hung_job_and_kills_its_process(redis_url, redis_client, tmp_path, procs):
    """A job stuck between step boundaries (here: a 30 s sleep in one step) past its limit."""
    env = worker_env(
        redis_url,
        tmp_path / "data",
        JOB_TIMEOUT_MIN_S=0.5,
        JOB_TIMEOUT_FACTOR=1,
        HARD_TIMEOUT_GRACE_S=0.5,
        WORKER_NAME="hung-worker",
    )
    worker = procs("worker.run", env, tmp_path / "worker.log")
    store = JobStore(redis_client)
    live_worker(store, lambda w: w["name"] == "hung-worker")
    job_id = submit(redis_client, num_inference_steps=3, test_hooks={"step_delay_s": 30})
    rec = wait_status(store, job_id, ("failed", "completed"), timeout_s=20)
    assert (rec.status, rec.error_code) == (
        "failed",
        "timeout",
    ) and "no progress" in rec.error_message
    assert worker.proc.wait(10) == -signal.SIGKILL  # the launcher would start a fresh one
