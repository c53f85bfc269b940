"""Worker processes for real (`python -m worker`, the launcher and its CPU worker with the tiny
model) under abuse: a SIGTERM re-queue followed by a `kill -9`, a worker stopped with SIGSTOP
mid-job, a cancel that arrives while a step never ends. Each test is bounded by its timeouts."""

from __future__ import annotations

import os
import signal
import time

import pytest
from worker_helpers import events, live_worker, submit, wait_for, wait_status, worker_env

from contract.store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Test worker environment: heartbeat every 0.5 s, dead after 3 s (`worker_env`).
TTL_S = 3.0
INTERVAL_S = 0.5


def new_worker(store, old_name: str, timeout_s: float = 90) -> dict:
    return live_worker(store, lambda w: w["name"] != old_name, timeout_s=timeout_s)


def test_a_sigterm_requeue_does_not_use_up_lost_job_retries(
    redis_url, redis_client, tmp_path, procs
):
    """SIGTERM re-queues the job (a graceful stop), then its next worker is killed with
    SIGKILL: with LOST_JOB_RETRIES=1 that death is the job's first, so it runs a third time and
    completes."""
    store = JobStore(redis_client)
    launcher = procs(
        "worker",
        worker_env(redis_url, tmp_path / "data", LOST_JOB_RETRIES=1, STOP_GRACE_S=0),
        tmp_path / "launcher.log",
    )
    first = live_worker(store)
    job_id = submit(redis_client, num_inference_steps=8, test_hooks={"step_delay_s": 0.3})
    wait_for(lambda: (store.get(job_id).step or 0) >= 1, what="step 1")
    os.kill(first["pid"], signal.SIGTERM)  # re-queued at its next step (STOP_GRACE_S=0)
    second = new_worker(store, first["name"])
    wait_for(
        lambda: (r := store.get(job_id)).worker == second["name"] and r.step >= 1,
        timeout_s=30,
        what="the job to run on the second worker",
    )
    os.kill(second["pid"], signal.SIGKILL)
    rec = wait_status(store, job_id, ("completed", "failed"), timeout_s=120)
    assert rec.status == "completed", launcher.text()[-3000:]
    assert (rec.attempts, rec.lost) == (3, 1)
    reasons = [e.get("reason", "") for e in events(redis_client, job_id) if e["type"] == "requeued"]
    assert len(reasons) == 2 and "shutting down" in reasons[0] and "worker_lost" in reasons[1]


def test_a_sigstopped_worker_is_replaced_and_its_job_retried(
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
    os.kill(first["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(
            lambda: not os.path.exists(f"/proc/{first['pid']}"),
            timeout_s=TTL_S + 10,
            what="the stopped worker to be killed and reaped",
        )
        killed_s = time.monotonic() - stopped_at
        # Its heartbeat stops at once: killed after the TTL, noticed within one more interval.
        assert killed_s < TTL_S + 2 * INTERVAL_S + 1.5, killed_s
        # Its job was re-queued (by the launcher reaping it, or by a janitor sweep that saw the
        # heartbeat expire a moment before).
        assert "requeued" in [e["type"] for e in events(redis_client, job_id)]
    finally:
        if os.path.exists(f"/proc/{first['pid']}"):
            os.kill(first["pid"], signal.SIGCONT)
    rec = wait_status(store, job_id, ("completed", "failed"), timeout_s=120)
    assert (rec.status, rec.attempts, rec.lost) == ("completed", 2, 1), launcher.text()[-3000:]
    assert rec.worker != first["name"]
    assert "its heartbeat stopped" in launcher.text()


def test_a_cancel_stops_a_job_stuck_in_a_step_within_cancel_grace(
    redis_url, redis_client, tmp_path, procs
):
    """The job sleeps a minute inside its first step, so the cooperative check never comes:
    the launcher kills the worker CANCEL_GRACE_S after seeing the cancel, the job ends
    cancelled, and a fresh worker takes the next job."""
    grace_s = 2.0
    store = JobStore(redis_client)
    launcher = procs(
        "worker",
        worker_env(redis_url, tmp_path / "data", CANCEL_GRACE_S=grace_s, LOST_JOB_RETRIES=1),
        tmp_path / "launcher.log",
    )
    first = live_worker(store)
    stuck = submit(redis_client, num_inference_steps=3, test_hooks={"step_delay_s": 60})
    live_worker(store, lambda w: w.get("job_id") == stuck, timeout_s=30)
    store.request_cancel(stuck)  # what POST /jobs/{id}/cancel does for a running job
    cancelled_at = time.monotonic()
    rec = wait_status(store, stuck, ("cancelled", "completed", "failed"), timeout_s=30)
    took_s = time.monotonic() - cancelled_at
    assert (rec.status, rec.error_code) == ("cancelled", "cancelled"), rec
    assert "has not stopped (CANCEL_GRACE_S=2)" in rec.error_message
    # The bound: CANCEL_GRACE_S, plus one watchdog interval, plus the heartbeat's lag.
    assert grace_s <= took_s < grace_s + 2 * INTERVAL_S + 1.5, took_s
    assert rec.step < 3

    second = new_worker(store, first["name"])
    nxt = submit(redis_client, num_inference_steps=2)
    rec = wait_status(store, nxt, ("completed", "failed"), timeout_s=60)
    assert (rec.status, rec.worker) == ("completed", second["name"]), launcher.text()[-3000:]
