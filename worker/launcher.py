"""`python -m worker`: start one worker process per visible GPU and keep them running.

The launcher itself never imports torch (it stays small and cannot hold a CUDA context). It:

- plans the workers: one per GPU in `CUDA_VISIBLE_DEVICES` (else per GPU `nvidia-smi` lists), each
  started with only its own GPU visible; with no GPU, one CPU worker with `MODEL=tiny` (set
  `WORKER_DEVICE=cpu` to run another `MODEL` on the CPU on purpose);
- starts each as `python -m worker.run` with a unique `WORKER_NAME`, in its own session (so a
  terminal's Ctrl-C reaches only the launcher, which forwards one SIGTERM) and with a parent-death
  signal (so workers never outlive a killed launcher);
- restarts a worker that exits: at once after a deliberate restart (exit code 75, e.g. after a
  CUDA out-of-memory error, for a clean context), else after 1 s, doubling up to
  `RESTART_BACKOFF_MAX_S` while it keeps dying within a minute of starting;
- when a worker dies, hands its job to the janitor at once (failed with `worker_lost` or
  re-queued) rather than waiting for its heartbeat to expire, and runs the janitor every
  `JANITOR_INTERVAL_S` for workers on other hosts and expired results;
- on SIGTERM or SIGINT forwards SIGTERM to the workers (each finishes or re-queues its job) and
  exits when they have; a second signal is forwarded too (workers then re-queue at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from contract.supervise import EXIT_RESTART, Backoff, describe_exit, setup_logging, spawn

from .settings import WorkerSettings

log = logging.getLogger("worker.launcher")

POLL_S = 0.2


@dataclass
class Slot:
    """One worker position (a GPU, or the CPU) and the process currently filling it."""

    label: str
    env: dict
    proc: subprocess.Popen | None = None
    name: str = ""
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(30.0))
    start_after: float = 0.0
    restarts: int = 0
    history: list = field(default_factory=list)


def detect_gpus(env: dict) -> list[str]:
    """GPU ids visible to this process: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`,
    else `/dev/nvidiaN` device nodes. `[]` means none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for part in visible.split(","):
            part = part.strip()
            if not part or part == "-1":
                break  # CUDA ignores everything from the first invalid entry on
            ids.append(part)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            ids = [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.MULTILINE)]
            if ids:
                return ids
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        nodes = [n for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n)]
    except OSError:
        nodes = []
    return sorted((n[len("nvidia") :] for n in nodes), key=int)


def plan_slots(settings: WorkerSettings, env: dict) -> list[Slot]:
    """The workers to run (see the module docstring)."""
    if settings.WORKER_DEVICE != "cpu":
        gpus = detect_gpus(env)
        if gpus:
            return [
                Slot(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": g, "WORKER_DEVICE": "cuda"}) for g in gpus
            ]
        if settings.WORKER_DEVICE == "cuda":
            raise SystemExit(
                "WORKER_DEVICE=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi)"
            )
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "WORKER_DEVICE": "cpu"}
    if settings.WORKER_DEVICE == "auto" and settings.MODEL != "tiny":
        log.warning(
            "no GPU visible: running one CPU worker with MODEL=tiny instead of MODEL=%s "
            "(set WORKER_DEVICE=cpu to run that model on the CPU anyway)",
            settings.MODEL,
        )
        cpu_env["MODEL"] = "tiny"
    return [Slot("cpu", cpu_env)]


class Launcher:
    """Runs the planned worker processes until told to stop (see the module docstring)."""

    def __init__(
        self,
        settings: WorkerSettings,
        slots: list[Slot],
        *,
        janitor=None,
        command: list[str] | None = None,
    ):
        self.settings = settings
        self.slots = slots
        self.janitor = janitor
        self.command = command or [sys.executable, "-m", "worker.run"]
        self.stopping = False
        self.signals = 0
        self.next_janitor_at = 0.0
        self.host = socket.gethostname()

    # -- processes ---------------------------------------------------------------------------
    def start(self, slot: Slot) -> None:
        slot.name = f"{self.host}.{slot.label}.{os.getpid()}.{secrets.token_hex(3)}"
        env = {**os.environ, **slot.env, "WORKER_NAME": slot.name}
        slot.proc = spawn(self.command, env)
        slot.started_at = time.monotonic()
        log.info("started worker %s (pid %d) on %s", slot.name, slot.proc.pid, slot.label)

    def on_exit(self, slot: Slot, code: int) -> None:
        proc = slot.proc
        assert proc is not None, "on_exit is for the slot's process that just ended"
        uptime = time.monotonic() - slot.started_at
        how = describe_exit(code)
        slot.history.append((slot.name, code))
        (log.info if code in (0, EXIT_RESTART) else log.warning)(
            "worker %s (pid %d) ended after %.1f s with %s", slot.name, proc.pid, uptime, how
        )
        if self.janitor is not None:
            try:
                self.janitor.reap_worker(slot.name, reason=how)
            except Exception:  # Redis down: the heartbeat TTL path catches the job later
                log.exception("could not reap the job of worker %s", slot.name)
        slot.proc = None
        if self.stopping:
            return
        slot.restarts += 1
        slot.backoff.max_s = self.settings.RESTART_BACKOFF_MAX_S
        delay = slot.backoff.delay_s(code, uptime)
        slot.start_after = time.monotonic() + delay
        log.info("restarting %s in %.0f s", slot.label, delay)

    def forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    # -- main loop ---------------------------------------------------------------------------
    def request_stop(self, signum, frame) -> None:
        self.signals += 1
        self.stopping = True
        log.info(
            "got %s: stopping workers (%s)",
            signal.Signals(signum).name,
            "they finish or re-queue their jobs" if self.signals == 1 else "re-queue now",
        )
        self.forward(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        for slot in self.slots:
            self.start(slot)
        while True:
            now = time.monotonic()
            alive = 0
            for slot in self.slots:
                if slot.proc is not None:
                    code = slot.proc.poll()
                    if code is None:
                        alive += 1
                        continue
                    self.on_exit(slot, code)
                if slot.proc is None and not self.stopping and now >= slot.start_after:
                    self.start(slot)
                    alive += 1
            if self.stopping and alive == 0:
                log.info("all workers stopped")
                return 0
            if self.janitor is not None and now >= self.next_janitor_at and not self.stopping:
                self.next_janitor_at = now + self.settings.JANITOR_INTERVAL_S
                try:
                    self.janitor.sweep()
                except Exception:
                    log.exception("janitor sweep failed")
            time.sleep(POLL_S)


def main() -> int:
    settings = WorkerSettings()
    setup_logging(settings.LOG_LEVEL)
    slots = plan_slots(settings, dict(os.environ))
    from .janitor import Janitor

    janitor = Janitor.from_settings(settings)
    log.info(
        "launching %d worker(s) on queue(s) %s, model %s: %s",
        len(slots),
        settings.QUEUE_NAME,
        settings.MODEL,
        ", ".join(s.label for s in slots),
    )
    return Launcher(settings, slots, janitor=janitor).run()
