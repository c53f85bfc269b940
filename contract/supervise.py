"""Running child processes the same way everywhere: `make serve`'s stack (`service.serve`) and the
worker launcher (`worker.launcher`) both start children with these helpers and restart them with
the same back-off.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
from typing import IO, Optional

# Exit code of a child that asks to be restarted with a fresh process (sysexits' EX_TEMPFAIL),
# e.g. a worker after a CUDA out-of-memory error, for a clean context.
EXIT_RESTART = 75
# Exit code of a child that cannot run with its configuration (sysexits' EX_CONFIG), e.g. a
# worker group whose GPU count does not divide the model's heads: restarting cannot help, so
# its supervisor stops instead.
EXIT_CONFIG = 78
# A child that ran this long before exiting was healthy: its next restart has no back-off.
HEALTHY_UPTIME_S = 60.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`), so
    nothing outlives a supervisor killed with SIGKILL."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def spawn(argv: list[str], env: dict, *, output: Optional[IO[bytes]] = None) -> subprocess.Popen:
    """Start a child in its own session (a terminal's Ctrl-C reaches only the supervisor, which
    stops children in order) that dies with its parent; `output` takes stdout and stderr."""
    return subprocess.Popen(
        argv,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )


class Backoff:
    """When to restart a child that exited: at once after a deliberate restart (`EXIT_RESTART`),
    after 1 s when it had run `HEALTHY_UPTIME_S`, else 1, 2, 4 ... s up to `max_s` while it keeps
    dying soon after starting."""

    def __init__(self, max_s: float):
        self.max_s = float(max_s)
        self.quick_failures = 0

    def delay_s(self, code: Optional[int], uptime_s: float) -> float:
        if code == EXIT_RESTART:
            return 0.0
        if uptime_s >= HEALTHY_UPTIME_S:
            self.quick_failures = 0
            return 1.0
        self.quick_failures += 1
        return min(self.max_s, 2.0 ** (self.quick_failures - 1))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def describe_exit(code: int) -> str:
    """`"exit code 3"` or `"signal SIGKILL"` for a `Popen.returncode`."""
    return f"signal {signal_name(-code)}" if code < 0 else f"exit code {code}"


def setup_logging(level: str) -> None:
    """One log format for every process of the system, on stderr."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=LOG_FORMAT)
