"""One worker process (`python -m worker.run`; the launcher starts one per GPU).

Loads and warms up the pipeline once (`worker.runtime`), then runs an RQ `SimpleWorker` loop:
jobs execute in this process, so the model stays on the GPU (RQ's forking worker would have to
reload it for every job, and CUDA does not survive a fork).

`SimpleWorker` sends no heartbeat while a job runs, so a thread of ours writes one every
`HEARTBEAT_INTERVAL_S` (`vmoba:worker:<name>`, TTL `HEARTBEAT_TTL_S`) with what the worker is
doing and its measured speed; `/readyz` and the janitor read it. The same thread is a watchdog: a
job past its timeout by `HARD_TIMEOUT_GRACE_S` without reaching a step boundary (a hung kernel or
decode) is failed with `timeout` and the process kills itself; the launcher starts a fresh one.

Signals (RQ's handling, plus ours): the first SIGTERM/SIGINT lets the current job finish when it
ends within `STOP_GRACE_S`, else the job stops at its next step and goes back to the front of the
queue; the worker then exits. A second signal re-queues at once. Exit code 75 asks the launcher
for a restart (after a CUDA out-of-memory error, for a clean CUDA context).

In a worker group (`GPUS_PER_JOB` > 1) this is rank 0; the other ranks run `run_follower`
instead, making rank 0's pipeline calls with it (`worker.group`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rq import SimpleWorker

from contract.supervise import EXIT_RESTART, setup_logging

from . import runtime as runtime_mod
from .group import GroupStop, decode_call
from .runtime import Runtime
from .settings import WorkerSettings

log = logging.getLogger("worker.run")


class GenerationWorker(SimpleWorker):
    """`SimpleWorker` that knows our runtime: SIGTERM reaches the running job's step checks, and
    a job that asks for a fresh process (CUDA OOM) stops the loop after it."""

    def __init__(self, *args, runtime: Runtime, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def execute_job(self, job, queue):
        super().execute_job(job, queue)
        if self.runtime.restart_reason:
            self.log.warning(
                "Worker %s: restarting for a clean context after %s",
                self.name,
                self.runtime.restart_reason,
            )
            self._stop_requested = True

    def request_stop(self, signum, frame):
        if self.runtime.stop_requested_at is None:
            self.runtime.stop_requested_at = time.monotonic()
        super().request_stop(signum, frame)


class Heartbeat(threading.Thread):
    """Writes this worker's heartbeat and watches the running job's deadline."""

    def __init__(self, rt: Runtime):
        super().__init__(name="vmoba-heartbeat", daemon=True)
        self.rt = rt
        self.stop_event = threading.Event()

    def beat(self) -> None:
        self.rt.store.heartbeat(
            self.rt.name,
            self.rt.heartbeat_info(),
            ttl_s=max(1, round(self.rt.settings.HEARTBEAT_TTL_S)),
        )

    def start(self) -> None:
        # The first beat before RQ can take a job: the janitor takes the worker a started job
        # names for dead while it has no heartbeat.
        self.beat()
        super().start()

    def run(self) -> None:
        interval = self.rt.settings.HEARTBEAT_INTERVAL_S
        while True:
            try:
                self.beat()
            except Exception as exc:  # Redis hiccup: try again next time
                log.warning("heartbeat failed: %s", exc)
            self.watchdog()
            if self.stop_event.wait(interval):
                return

    def watchdog(self) -> None:
        cur = self.rt.current
        grace = self.rt.settings.HARD_TIMEOUT_GRACE_S
        if cur is None or time.monotonic() < cur.deadline + grace:
            return
        message = (
            f"timed out: no progress for {time.monotonic() - cur.started:.0f} s at step "
            f"{cur.step} of {cur.total_steps} ({grace:g} s past the job's limit); the "
            "worker process was restarted"
        )
        log.error("job %s: %s", cur.job_id, message)
        try:
            self.rt.store.mark_failed(cur.job_id, "timeout", message)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class BeatFile(threading.Thread):
    """Touches `path` every `interval_s`: the launcher's sign that this follower is not hung."""

    def __init__(self, path: str, interval_s: float):
        super().__init__(name="vmoba-group-beat", daemon=True)
        self.path = Path(path)
        self.interval_s = interval_s

    def run(self) -> None:
        while True:
            try:
                self.path.touch()
            except OSError as exc:
                log.warning("cannot touch %s: %s", self.path, exc)
            time.sleep(self.interval_s)


def run_follower(settings: WorkerSettings) -> int:
    """A follower's life: join, load, then make rank 0's calls until it says exit. Any failure
    ends the process: the launcher restarts the whole group."""
    if settings.GROUP_BEAT_FILE:
        BeatFile(settings.GROUP_BEAT_FILE, settings.HEARTBEAT_INTERVAL_S).start()
    rt = Runtime.load(settings)
    group = rt.group
    assert group is not None and not group.leader
    log.info("follower rank %d ready", group.rank)
    while True:
        call = group.next_call()
        if call is None:
            log.info("rank 0 said exit")
            group.close()
            return 0
        try:
            rt.generate(**decode_call(call), on_step=group.following, decode=False)
        except GroupStop as exc:
            log.info("%s", exc)


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings()
    setup_logging(settings.LOG_LEVEL)
    if settings.GPUS_PER_JOB > 1 and settings.GROUP_RANK > 0:
        return run_follower(settings)
    rt = Runtime.load(settings)
    runtime_mod.install(rt)
    heartbeat = Heartbeat(rt)
    heartbeat.start()
    # RQ's blocking dequeue waits minutes and RQ raises the socket timeout of its connection to
    # cover that, but only new connections pick it up; redis-py 8's default timeout is 5 s. A client
    # of its own, unused until RQ configures it, keeps an idle worker from timing out, backing off
    # (up to a minute) and picking up new jobs late. Like the runtime's, it rides out a Redis
    # restart (REDIS_RETRY_S).
    rq_connection = settings.redis_client()
    worker = GenerationWorker(
        settings.queues,
        connection=rq_connection,
        name=rt.name,
        runtime=rt,
        default_result_ttl=settings.RQ_RESULT_TTL_S,
    )
    try:
        worker.work(burst=settings.WORKER_BURST, logging_level=settings.LOG_LEVEL.upper())
    finally:
        heartbeat.stop()
        if rt.group is not None and not rt.restart_reason:
            rt.group.close()  # the followers exit too
        try:
            rt.store.drop_worker(rt.name)
        except Exception as exc:
            log.warning("could not drop the heartbeat of %s: %s", rt.name, exc)
    return EXIT_RESTART if rt.restart_reason else 0


if __name__ == "__main__":
    sys.exit(main())
