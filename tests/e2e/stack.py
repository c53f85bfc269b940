"""The stack the end-to-end tests run: `python -m service.serve` (private Redis, real uvicorn,
real CPU worker with the tiny model) in a temporary folder, and helpers to look at it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx

from service.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180


def decode(path_or_bytes, tmp_path: Path):
    """`(frames, width, height, fps)` of an mp4, decoded with PyAV."""
    if isinstance(path_or_bytes, bytes):
        path = tmp_path / f"v{time.time_ns()}.mp4"
        path.write_bytes(path_or_bytes)
    else:
        path = path_or_bytes
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = sum(1 for _ in c.decode(s))
        return frames, s.codec_context.width, s.codec_context.height, float(s.average_rate)


def children_of(pid: int) -> set[int]:
    """All descendants of `pid` (from /proc), in any session."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


class Stack:
    def __init__(self, tmp: Path, **extra_env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_KEYS")}
        env.update(
            PORT=str(self.port),
            DATA_DIR=str(tmp / "data"),
            MODEL="tiny",
            POLL_AFTER_MS="100",
            HEARTBEAT_INTERVAL_S="1",
            WARMUP_STEPS="1",
            PYTHONPATH=str(ROOT),
        )
        env.update(extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.serve"],
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "wb"),  # noqa: SIM115 - open for the child's whole life
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the stack did not get ready:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        """Ctrl-C, as a user would; SIGKILL to every descendant if it has not ended in 60 s."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in children_of(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()


@contextlib.contextmanager
def running(tmp: Path, **extra_env: str) -> Iterator[Stack]:
    """A ready `Stack` in `tmp`, stopped afterwards."""
    s = Stack(tmp, **extra_env)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def sse_events(url: str, timeout_s: float = 120) -> list[tuple[str, dict]]:
    out, block = [], {}
    with httpx.stream("GET", url, timeout=timeout_s) as r:
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if "data" in block:
                    out.append((block["event"], json.loads(block["data"])))
                block = {}
                continue
            name, _, value = line.partition(": ")
            block[name] = value
    return out
