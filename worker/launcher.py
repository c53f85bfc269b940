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
- watches each worker every `HEARTBEAT_INTERVAL_S` and kills it (SIGKILL), to be replaced at once,
  when its heartbeat has stopped for `HEARTBEAT_TTL_S` (a process hung with the GIL held, or
  stopped: the job then follows the worker-lost rules) or when the job it runs was cancelled
  more than `CANCEL_GRACE_S` ago and it has not stopped (a step that does not end: the job ends
  `cancelled`). A worker that has not beaten yet (loading its model) is left alone, and so is
  every worker while Redis does not answer (no heartbeat can be written then);
- on SIGTERM or SIGINT forwards SIGTERM to the workers (each finishes or re-queues its job) and
  exits when they have; a second signal is forwarded too (workers then re-queue at once);
- stops everything (exit code 78) when a worker exits with `EXIT_CONFIG`: a configuration it
  cannot run, which no restart fixes.

With `GPUS_PER_JOB=N` > 1 each slot is a worker group (`worker.group`): `N` GPUs (consecutive
in the visible list; GPUs left over are unused), `N` processes that all see them, rank 0 the RQ
worker. If any rank exits, or a follower's heartbeat file goes `HEARTBEAT_TTL_S` without a touch,
every rank of the group is killed, rank 0's job is handed to the janitor (the worker-lost rules)
and the whole group is started again. Signals go to rank 0 only; its followers exit with it.
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract.supervise import (
    EXIT_CONFIG,
    EXIT_RESTART,
    Backoff,
    describe_exit,
    setup_logging,
    spawn,
)

from .group import group_env
from .settings import WorkerSettings

log = logging.getLogger("worker.launcher")

POLL_S = 0.2


@dataclass
class Slot:
    """One worker position (a GPU or a group of `ranks` GPUs, or the CPU) and the processes
    currently filling it (`proc` is rank 0's)."""

    label: str
    env: dict
    ranks: int = 1
    proc: subprocess.Popen | None = None
    followers: list = field(default_factory=list)  # ranks 1.. (Popen)
    beat_files: list = field(default_factory=list)  # the followers' heartbeat files (Path)
    name: str = ""
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(30.0))
    start_after: float = 0.0
    restarts: int = 0
    history: list = field(default_factory=list)
    last_beat: float = 0.0  # wall time of the last heartbeat seen (0: none yet)
    cancel_seen: dict = field(default_factory=dict)  # job id -> when its cancel was first seen
    kill_reason: str = ""  # why the launcher killed the current process


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
    n = settings.GPUS_PER_JOB
    if settings.WORKER_DEVICE != "cpu":
        gpus = detect_gpus(env)
        if gpus and n > len(gpus):
            raise SystemExit(
                f"GPUS_PER_JOB={n} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})"
            )
        if gpus:
            groups = [gpus[i : i + n] for i in range(0, len(gpus) - len(gpus) % n, n)]
            if len(gpus) % n:
                log.warning(
                    "GPUS_PER_JOB=%d: %d GPU(s) left over and unused (%s)",
                    n,
                    len(gpus) % n,
                    ",".join(gpus[len(groups) * n :]),
                )
            return [
                Slot(
                    f"gpu{'-'.join(g)}",
                    {"CUDA_VISIBLE_DEVICES": ",".join(g), "WORKER_DEVICE": "cuda"},
                    ranks=n,
                )
                for g in groups
            ]
        if settings.WORKER_DEVICE == "cuda":
            raise SystemExit(
                "WORKER_DEVICE=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi)"
            )
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "WORKER_DEVICE": "cpu"}
    if settings.WORKER_DEVICE == "auto" and any(s.weights != "tiny" for s in settings.models()):
        log.warning(
            "no GPU visible: running one CPU worker with MODEL=tiny instead of MODEL=%s "
            "(set WORKER_DEVICE=cpu to run that model on the CPU anyway)",
            settings.MODEL,
        )
        cpu_env["MODEL"] = "tiny"
    return [Slot("cpu", cpu_env, ranks=n)]


def free_port() -> int:
    """A TCP port free on localhost now (for a group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Runs the planned worker processes until told to stop (see the module docstring)."""

    def __init__(
        self,
        settings: WorkerSettings,
        slots: list[Slot],
        *,
        janitor=None,
        command: list[str] | None = None,
        store=None,
    ):
        self.settings = settings
        self.slots = slots
        self.janitor = janitor
        self.store = store if store is not None else getattr(janitor, "store", None)
        self.command = command or [sys.executable, "-m", "worker.run"]
        self.stopping = False
        self.signals = 0
        self.next_janitor_at = 0.0
        self.next_watch_at = 0.0
        self.redis_back_at = 0.0  # wall time Redis answered again after failing (0: never failed)
        self.redis_down = False
        self.host = socket.gethostname()
        self.exit_code = 0
        self.beat_dir: Path | None = None  # the followers' heartbeat files, made when needed

    # -- processes ---------------------------------------------------------------------------
    def start(self, slot: Slot) -> None:
        slot.name = f"{self.host}.{slot.label}.{os.getpid()}.{secrets.token_hex(3)}"
        env = {**os.environ, **slot.env, "WORKER_NAME": slot.name}
        slot.started_at = time.monotonic()
        slot.last_beat = 0.0
        slot.cancel_seen = {}
        slot.kill_reason = ""
        if slot.ranks == 1:
            slot.proc = spawn(self.command, env)
            log.info("started worker %s (pid %d) on %s", slot.name, slot.proc.pid, slot.label)
            return
        if self.beat_dir is None:
            self.beat_dir = Path(tempfile.mkdtemp(prefix="vmoba-group-"))
        port = free_port()
        slot.beat_files = [self.beat_dir / f"{slot.label}.rank{r}" for r in range(1, slot.ranks)]
        for path in slot.beat_files:
            path.unlink(missing_ok=True)
        procs = []
        for rank in range(slot.ranks):
            beat = str(slot.beat_files[rank - 1]) if rank else ""
            rank_env = {**env, **group_env(rank, slot.ranks, port, beat)}
            if rank:
                rank_env["WORKER_NAME"] = f"{slot.name}.rank{rank}"
            procs.append(spawn(self.command, rank_env))
        slot.proc, slot.followers = procs[0], procs[1:]
        log.info(
            "started worker group %s on %s: %d ranks (pids %s)",
            slot.name,
            slot.label,
            slot.ranks,
            " ".join(str(p.pid) for p in procs),
        )

    def ended(self, slot: Slot) -> tuple[int, int] | None:
        """`(rank, exit code)` of a process of the slot that has ended, else None. For a group,
        every other rank is then killed (and reaped) before this returns. When several ended
        already, one killed by a signal is named first: the others most likely failed after it
        (a collective with a dead peer)."""
        assert slot.proc is not None
        procs = [slot.proc, *slot.followers]
        done = [(r, code) for r, p in enumerate(procs) if (code := p.poll()) is not None]
        if not done:
            return None
        rank, code = min(done, key=lambda rc: (rc[1] >= 0, rc[0]))
        for other in procs:
            if other.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    other.kill()
        for other in procs:
            other.wait()
        return rank, code

    def on_exit(self, slot: Slot, code: int, rank: int = 0) -> None:
        proc = slot.proc
        assert proc is not None, "on_exit is for the slot's process that just ended"
        uptime = time.monotonic() - slot.started_at
        how = describe_exit(code)
        if slot.ranks > 1:
            how = f"rank {rank} of the group ended with {how}; every rank was stopped"
        if slot.kill_reason:
            how = f"killed by its launcher: {slot.kill_reason}"
        slot.history.append((slot.name, code))
        (log.info if code in (0, EXIT_RESTART) else log.warning)(
            "worker %s (pid %d) ended after %.1f s with %s", slot.name, proc.pid, uptime, how
        )
        if self.janitor is not None:
            try:
                self.janitor.reap_worker(slot.name, reason=how)
            except Exception:  # Redis down: the heartbeat TTL path catches the job later
                log.exception("could not reap the job of worker %s", slot.name)
        slot.proc, slot.followers = None, []
        if code == EXIT_CONFIG:
            log.error(
                "worker %s cannot run with this configuration (see its message above): stopping",
                slot.name,
            )
            self.exit_code = EXIT_CONFIG
            if not self.stopping:
                self.stopping = True
                self.forward(signal.SIGTERM)
        if self.stopping:
            return
        slot.restarts += 1
        slot.backoff.max_s = self.settings.RESTART_BACKOFF_MAX_S
        # A worker the launcher killed was replaced on purpose: at once.
        delay = slot.backoff.delay_s(EXIT_RESTART if slot.kill_reason else code, uptime)
        slot.start_after = time.monotonic() + delay
        log.info("restarting %s in %.0f s", slot.label, delay)

    def forward(self, sig: int) -> None:
        """Send `sig` to every worker (rank 0 of a group: the followers exit with it)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    # -- watchdog ----------------------------------------------------------------------------
    def watch(self) -> None:
        """One look at every worker's heartbeat and at the cancel flag of the job it runs (see
        the module docstring)."""
        if self.store is None:
            return
        try:
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is None and not slot.kill_reason:
                    self.watch_slot(slot)
        except Exception as exc:  # Redis unreachable: nobody can beat; judge nobody
            if not self.redis_down:
                log.warning("watchdog: cannot read heartbeats (%s); not judging workers", exc)
            self.redis_down = True
            return
        if self.redis_down:
            self.redis_down = False
            self.redis_back_at = time.time()

    def watch_slot(self, slot: Slot) -> None:
        s = self.settings
        assert self.store is not None
        self.watch_followers(slot)
        if slot.kill_reason:
            return
        info = self.store.worker_info(slot.name)
        now = time.time()
        if self.redis_down:
            # Redis answers again: heartbeats lost meanwhile are not the worker's fault.
            self.redis_back_at = now
        if info is not None:
            slot.last_beat = max(slot.last_beat, float(info.get("ts") or 0.0))
        elif slot.last_beat and now - max(slot.last_beat, self.redis_back_at) > s.HEARTBEAT_TTL_S:
            self.kill(
                slot,
                f"its heartbeat stopped {now - slot.last_beat:.1f} s ago "
                f"(HEARTBEAT_TTL_S={s.HEARTBEAT_TTL_S:g}): hung or stopped",
            )
            return
        job_id = info.get("job_id") if info else None
        if not job_id or not self.store.is_cancel_requested(job_id):
            return
        seen = slot.cancel_seen.setdefault(job_id, time.monotonic())
        if time.monotonic() - seen > s.CANCEL_GRACE_S:
            self.kill(
                slot,
                f"job {job_id} was cancelled {time.monotonic() - seen:.1f} s ago and has not "
                f"stopped (CANCEL_GRACE_S={s.CANCEL_GRACE_S:g})",
            )

    def watch_followers(self, slot: Slot) -> None:
        """Kill a group one of whose followers has not touched its heartbeat file for
        `HEARTBEAT_TTL_S` (hung, or stopped). A follower that has not touched it yet is
        starting: left alone."""
        ttl = self.settings.HEARTBEAT_TTL_S
        for rank, path in enumerate(slot.beat_files, 1):
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > ttl:
                self.kill(
                    slot,
                    f"the heartbeat of rank {rank} stopped {age:.1f} s ago "
                    f"(HEARTBEAT_TTL_S={ttl:g}): hung or stopped",
                )
                return

    def kill(self, slot: Slot, reason: str) -> None:
        """SIGKILL a worker (every rank of a group) that cannot be trusted to stop; `run` reaps
        and replaces it."""
        proc = slot.proc
        if proc is None:
            return
        log.error("killing worker %s (pid %d): %s", slot.name, proc.pid, reason)
        slot.kill_reason = reason
        for p in (proc, *slot.followers):
            with contextlib.suppress(ProcessLookupError):
                p.kill()

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
                    ended = self.ended(slot)
                    if ended is None:
                        alive += 1
                        continue
                    rank, code = ended
                    self.on_exit(slot, code, rank)
                if slot.proc is None and not self.stopping and now >= slot.start_after:
                    self.start(slot)
                    alive += 1
            if self.stopping and alive == 0:
                log.info("all workers stopped")
                if self.beat_dir is not None:
                    shutil.rmtree(self.beat_dir, ignore_errors=True)
                return self.exit_code
            if now >= self.next_watch_at:
                self.next_watch_at = now + self.settings.HEARTBEAT_INTERVAL_S
                self.watch()
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
