"""Worker heartbeats: a worker is alive while its key `vmoba:worker:<name>` exists.

Each worker refreshes its key (TTL `HEARTBEAT_TTL_S`) from a thread, busy or idle; the API's
`/readyz` and `/models`, and the janitor's dead-worker scan, read them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional

from .keys import WORKERS_KEY, worker_key
from .ops import Ops, pipelined
from .record import as_text

# Heartbeat lifetime used when the worker does not choose one.
HEARTBEAT_TTL_S = 30


def beat(name: str, info: Optional[dict] = None, ttl_s: float = HEARTBEAT_TTL_S) -> Ops[None]:
    """Say that worker `name` is alive for `ttl_s` more seconds. `info` is free-form JSON, by
    convention `{queue, model, device, pid, host, job_id, speed, ...}`."""
    body = {
        "name": name,
        "ts": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **(info or {}),
    }

    def build(pipe: Any) -> None:
        pipe.set(worker_key(name), json.dumps(body), ex=max(1, int(ttl_s)))
        pipe.sadd(WORKERS_KEY, name)

    yield pipelined(build)


def drop(name: str) -> Ops[None]:
    """Forget a worker now (clean shutdown)."""

    def build(pipe: Any) -> None:
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS_KEY, name)

    yield pipelined(build)


def alive(name: str) -> Ops[bool]:
    return bool((yield lambda r: r.exists(worker_key(name))))


def info(name: str) -> Ops[Optional[dict]]:
    """The heartbeat info of worker `name` while it is alive, else None."""
    value = yield lambda r: r.get(worker_key(name))
    if value is None:
        return None
    try:
        found = json.loads(as_text(value))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def live(queue: Optional[str] = None) -> Ops[list[dict]]:
    """Heartbeat infos of workers alive now (on `queue`, if given); forgets the dead ones."""
    names = sorted(as_text(n) for n in (yield lambda r: r.smembers(WORKERS_KEY)))
    if not names:
        return []
    values = yield lambda r: r.mget([worker_key(n) for n in names])
    found, dead = [], []
    for name, value in zip(names, values):
        if value is None:
            dead.append(name)
            continue
        try:
            info = json.loads(as_text(value))
        except ValueError:
            continue
        if queue is None or info.get("queue") in (None, queue):
            found.append(info)
    if dead:
        yield lambda r: r.srem(WORKERS_KEY, *dead)
    return found
