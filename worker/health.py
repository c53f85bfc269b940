"""`python -m worker.health`: exit 0 when a worker on this host has a live heartbeat.

The worker container's healthcheck. Workers write their heartbeat only once the model is loaded
and warmed up, so "healthy" means "taking jobs"; the compose file gives the first load a long
`start_period` (a model download can take minutes). Torch-free and quick: one Redis round trip.
"""

from __future__ import annotations

import socket
import sys


def main() -> int:
    import redis

    from contract.store import JobStore

    from .settings import WorkerSettings

    settings = WorkerSettings()
    host = socket.gethostname()
    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5
        )
        live = [w for w in JobStore(client).live_workers() if w.get("host") == host]
    except redis.RedisError as exc:
        print(f"unhealthy: Redis at {settings.REDIS_URL} unreachable ({exc})")
        return 1
    if not live:
        print(f"unhealthy: no live worker on host {host} (still loading the model, or crashed)")
        return 1
    print(
        f"healthy: {len(live)} worker(s) on {host}: "
        + ", ".join(f"{w.get('name')} ({w.get('state')})" for w in live)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
