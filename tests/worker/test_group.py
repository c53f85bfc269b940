"""Worker groups (`GPUS_PER_JOB`): the launcher's plan, its handling of a group's processes, and
one group of two CPU ranks (gloo) for real through Redis: a job, a cancel that stops every rank
at the same step, and a rank killed mid-job (the group restarts, the job is retried)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from worker_helpers import events, live_worker, submit, wait_for, wait_status, worker_env

from contract.store import JobStore
from contract.supervise import EXIT_CONFIG
from worker.launcher import Launcher, Slot, plan_slots
from worker.settings import WorkerSettings

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def settings(**env) -> WorkerSettings:
    return WorkerSettings(**{"REDIS_URL": "redis://127.0.0.1:1/0", **env})


# -- the plan ---------------------------------------------------------------------------------


def test_groups_take_consecutive_gpus_and_leave_the_rest(caplog):
    slots = plan_slots(settings(GPUS_PER_JOB=2), {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4"})
    assert [(s.label, s.env["CUDA_VISIBLE_DEVICES"], s.ranks) for s in slots] == [
        ("gpu0-1", "0,1", 2),
        ("gpu2-3", "2,3", 2),
    ]
    assert "1 GPU(s) left over and unused (4)" in caplog.text
    eight = plan_slots(settings(GPUS_PER_JOB=4), {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in eight] == ["0,1,2,3", "4,5,6,7"]
    one = plan_slots(settings(), {"CUDA_VISIBLE_DEVICES": "3,5"})
    assert [(s.label, s.ranks) for s in one] == [("gpu3", 1), ("gpu5", 1)]


def test_more_gpus_per_job_than_visible_is_refused():
    with pytest.raises(SystemExit, match=r"GPUS_PER_JOB=4 but only 2 GPU\(s\) are visible"):
        plan_slots(settings(GPUS_PER_JOB=4), {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_a_cpu_host_runs_one_group_of_processes():
    (slot,) = plan_slots(settings(GPUS_PER_JOB=2, WORKER_DEVICE="cpu"), {})
    assert (slot.label, slot.ranks, slot.env["WORKER_DEVICE"]) == ("cpu", 2, "cpu")


# -- the launcher with stand-in processes -------------------------------------------------------


def group_launcher(command, ranks=2):
    slot = Slot("cpu", {"WORKER_DEVICE": "cpu"}, ranks=ranks)
    return Launcher(settings(GPUS_PER_JOB=ranks, HEARTBEAT_TTL_S=1), [slot], command=command), slot


def test_a_follower_that_dies_takes_its_group_down():
    launcher, slot = group_launcher(SLEEPER, ranks=3)
    launcher.start(slot)
    try:
        leader, followers = slot.proc, list(slot.followers)
        assert len(followers) == 2 and all(p.poll() is None for p in (leader, *followers))
        assert launcher.ended(slot) is None
        followers[1].kill()
        rank, code = wait_for(lambda: launcher.ended(slot), timeout_s=10, what="the group to end")
        assert (rank, code) == (2, -signal.SIGKILL)
        assert all(p.poll() is not None for p in (leader, *followers))  # nothing left running
        launcher.on_exit(slot, code, rank)
        assert slot.proc is None and slot.followers == [] and slot.restarts == 1
    finally:
        launcher.kill(slot, "test over")


def test_a_follower_whose_heartbeat_stops_gets_its_group_killed(tmp_path):
    launcher, slot = group_launcher(SLEEPER)
    launcher.start(slot)
    try:
        (beat,) = slot.beat_files
        launcher.watch_followers(slot)  # no beat yet: starting, left alone
        assert not slot.kill_reason
        beat.touch()
        launcher.watch_followers(slot)
        assert not slot.kill_reason
        old = time.time() - 5
        os.utime(beat, (old, old))
        launcher.watch_followers(slot)
        assert "the heartbeat of rank 1 stopped" in slot.kill_reason
        rank, code = wait_for(lambda: launcher.ended(slot), timeout_s=10, what="the kill")
        assert code == -signal.SIGKILL
    finally:
        launcher.kill(slot, "test over")


def test_a_configuration_a_group_cannot_run_stops_the_launcher():
    refuse = [
        sys.executable,
        "-c",
        f"import os, sys, time; r = os.environ['GROUP_RANK']; "
        f"sys.exit({EXIT_CONFIG}) if r == '1' else time.sleep(120)",
    ]
    launcher, _ = group_launcher(refuse)
    started = time.monotonic()
    assert launcher.run() == EXIT_CONFIG  # the leader is stopped with the follower; no restart
    assert time.monotonic() - started < 30


# -- a real group of two CPU ranks ---------------------------------------------------------------


def group_env(redis_url, data_dir, **extra) -> dict:
    # One torch thread per rank: two ranks share the test machine's cores.
    return worker_env(redis_url, data_dir, GPUS_PER_JOB=2, CPU_THREADS=1, **extra)


@pytest.mark.timeout(240)
def test_a_group_of_two_ranks_runs_cancels_and_survives_a_killed_rank(
    redis_url, redis_client, tmp_path, procs
):
    store = JobStore(redis_client)
    launcher = procs(
        "worker",
        group_env(redis_url, tmp_path / "data", LOST_JOB_RETRIES=1),
        tmp_path / "launcher.log",
    )
    first = live_worker(store, timeout_s=150)
    assert first["gpus_per_job"] == 2

    # a job runs on both ranks and completes
    done = submit(redis_client, num_inference_steps=2, attention={"dense_steps": 0.0})
    rec = wait_status(store, done, ("completed", "failed"), timeout_s=60)
    assert rec.status == "completed", (rec, launcher.text()[-3000:])
    assert (tmp_path / "data" / "jobs" / done / "video.mp4").stat().st_size > 0
    assert rec.density is not None and 0 < rec.density <= 1

    # a cancel stops every rank at the same step
    cancelled = submit(redis_client, num_inference_steps=20, test_hooks={"step_delay_s": 0.2})
    wait_for(lambda: (store.get(cancelled).step or 0) >= 2, what="step 2")
    store.request_cancel(cancelled)
    rec = wait_status(store, cancelled, ("cancelled", "completed", "failed"), timeout_s=30)
    assert rec.status == "cancelled", rec
    at = re.search(r"at step (\d+) of 20", rec.error_message or "")
    assert at, rec.error_message
    follower_stop = wait_for(
        lambda: re.search(r"rank 0 stopped the call at step (\d+) of 20", launcher.text()),
        timeout_s=10,
        what="the follower's stop",
    )
    assert follower_stop.group(1) == at.group(1)

    # rank 1 killed mid-job: the group is torn down and restarted, the job retried there
    job = submit(redis_client, num_inference_steps=8, test_hooks={"step_delay_s": 0.3})
    wait_for(lambda: (store.get(job).step or 0) >= 2, what="step 2")
    os.kill(follower_pid(first["pid"]), signal.SIGKILL)
    rec = wait_status(store, job, ("completed", "failed"), timeout_s=150)
    assert (rec.status, rec.attempts) == ("completed", 2), (rec, launcher.text()[-4000:])
    assert rec.worker != first["name"]
    assert "worker_lost" in [e.get("reason", "")[:11] for e in events(redis_client, job)]
    # rank 0 may see its peer gone (a failed collective: it exits at once) before the launcher
    # sees the kill; either way the whole group went and the job followed the worker-lost rules
    assert re.search(
        r"rank (1 of the group ended with signal SIGKILL|0 of the group ended with exit code 75)",
        launcher.text(),
    )
    with pytest.raises(ProcessLookupError):  # the old rank 0 went with its group
        os.kill(first["pid"], 0)


def follower_pid(leader_pid: int) -> int:
    """The pid of rank 1 of the group whose rank 0 is `leader_pid` (same WORKER_NAME stem)."""
    name = _environ(leader_pid)["WORKER_NAME"]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            env = _environ(int(entry.name))
            if env.get("WORKER_NAME") == f"{name}.rank1":
                return int(entry.name)
    raise AssertionError(f"no rank 1 of {name}")


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )
