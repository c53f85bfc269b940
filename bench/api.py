"""API benchmark: `POST /generate` latency and `GET /jobs/{id}` throughput, 100 clients, loopback.

```bash
python -m bench.api                      # or: make bench-api
python -m bench.api --clients 100 --duration-s 10 --api-workers 2 --machine dev-2core
```

No GPU and no workers: jobs only queue (the queue limit is raised for the run). The script starts
a private `redis-server` and the API exactly as `make serve` does (uvicorn with uvloop and
httptools, `API_WORKERS` processes), then runs the load from a separate process with a minimal
keep-alive HTTP/1.1 client on uvloop (a heavyweight client would measure itself; it shares the
machine's cores with the server, as it must on loopback).

Phases, each with `--clients` concurrent connections:

1. `post_paced`: every client sends `POST /generate` with a random prompt and seed, then waits an
   exponential think time (mean `clients / post_rate` s), so the offered load is about
   `--post-rate` jobs/s in total: the latency a user sees on a busy server.
2. `post_saturated`: every client sends POSTs back to back (no think time): the most the API can
   accept, and the latency when it is saturated (100 requests always in flight).
3. `get_saturated`: every client polls `GET /jobs/{id}` of random created jobs back to back:
   status reads per second.

Targets (issue 6): `post_paced` p99 < 20 ms; `get_saturated` >= 1000 reads/s. Results go to
`bench/results/api-<machine>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import RESULTS_DIR, timestamp
from service.serve import free_port

TARGET_POST_P99_MS = 20.0
TARGET_GET_RPS = 1000.0


# -- a minimal keep-alive HTTP/1.1 client ------------------------------------------------------


class Conn:
    """One keep-alive connection; `request` returns `(status, body)`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == "content-length:":
                length = int(line[15:].strip())
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def percentiles(samples_s: list[float]) -> dict:
    if not samples_s:
        return {}
    ms = sorted(x * 1000 for x in samples_s)

    def pct(p):
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    return {
        "p50_ms": round(pct(50), 3),
        "p90_ms": round(pct(90), 3),
        "p99_ms": round(pct(99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def post_body(rng: random.Random) -> bytes:
    return json.dumps(
        {
            "prompt": f"bench {rng.random():.12f} a fox in the snow",
            "seed": rng.randrange(2**31),
            "num_frames": 17,
            "width": 128,
            "height": 128,
        }
    ).encode()


async def phase(conns, duration_s, kind, post_rate=0.0, job_ids=None) -> dict:
    """Run one phase on open connections; returns its statistics (and the created job ids)."""
    clients = len(conns)
    latencies, statuses, created = [], {}, []
    deadline = time.perf_counter() + duration_s
    mean_think = clients / post_rate if post_rate else 0.0

    async def run(conn: Conn, seed: int):
        rng = random.Random(seed)
        if mean_think:  # spread the first requests out
            await asyncio.sleep(rng.uniform(0, mean_think))
        while time.perf_counter() < deadline:
            if kind == "get":
                method, path, body = "GET", f"/jobs/{rng.choice(job_ids)}", b""
            else:
                method, path, body = "POST", "/generate", post_body(rng)
            t0 = time.perf_counter()
            status, data = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if kind == "post" and status == 202:
                created.append(json.loads(data)["id"])
            if mean_think:
                await asyncio.sleep(
                    min(rng.expovariate(1 / mean_think), max(0.0, deadline - time.perf_counter()))
                )

    start = time.perf_counter()
    await asyncio.gather(*(run(c, random.randrange(2**32)) for c in conns))
    elapsed = time.perf_counter() - start
    ok = sum(n for s, n in statuses.items() if s < 400)
    return {
        "requests": len(latencies),
        "ok": ok,
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
        "_created": created,
    }


def load_process(host, port, args, out: mp.Queue) -> None:
    """The load generator (its own process, on uvloop)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main():
        # The clients connect once and keep their connections for the whole run (as a client
        # with a connection pool does); a warm-up on the same connections lets every server
        # process open its Redis connections and load its scripts before anything is measured.
        conns = [Conn(host, port) for _ in range(args.clients)]
        await asyncio.gather(*(c.open() for c in conns))
        res = {}
        warm = await phase(conns, 1.0, "post")
        warm = await phase(conns, 2.0, "post", post_rate=args.post_rate)
        await phase(conns, 1.0, "get", job_ids=warm["_created"])
        res["post_paced"] = await phase(conns, args.duration_s, "post", post_rate=args.post_rate)
        res["post_paced"]["offered_jobs_per_s"] = args.post_rate
        res["post_saturated"] = await phase(conns, args.duration_s / 2, "post")
        ids = res["post_paced"]["_created"] + res["post_saturated"]["_created"]
        res["get_saturated"] = await phase(conns, args.duration_s, "get", job_ids=ids)
        for c in conns:
            c.close()
        for r in res.values():
            r.pop("_created", None)
        res["jobs_created"] = len(ids)
        return res

    out.put(asyncio.run(main()))


# -- the server under test ---------------------------------------------------------------------


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument(
        "--post-rate",
        type=float,
        default=200.0,
        help="offered POSTs per second over all clients in the paced phase",
    )
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument(
        "--machine",
        default=f"{os.cpu_count()}core-{platform.machine()}",
        help="name in the results file: bench/results/api-<machine>.json",
    )
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()

    from service.serve import redis_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    rport, port = free_port(), free_port()
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    redis_server_binary(),
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        env = dict(
            os.environ,
            REDIS_URL=f"redis://127.0.0.1:{rport}/0",
            DATA_DIR=str(tmp / "data"),
            MODEL="tiny",
            MAX_QUEUE_DEPTH="10000000",
            API_WORKERS=str(args.api_workers),
        )
        if args.api_workers > 1:
            (tmp / "metrics").mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "service.app:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.api_workers),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                env=env,
            )
        )
        wait_http(f"http://127.0.0.1:{port}/healthz")
        time.sleep(1.0)  # let every uvicorn worker finish starting

        out: mp.Queue = mp.get_context("spawn").Queue()
        loader = mp.get_context("spawn").Process(
            target=load_process, args=("127.0.0.1", port, args, out)
        )
        loader.start()
        results = out.get(timeout=args.duration_s * 4 + 120)
        loader.join()
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    record = {
        "benchmark": "api",
        "date": timestamp(),
        "machine": args.machine,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "setup": {
            "clients": args.clients,
            "duration_s": args.duration_s,
            "api_workers": args.api_workers,
            "server": "uvicorn + uvloop + httptools, "
            "orjson responses, hiredis, one Redis pool per process",
            "redis": "private redis-server on loopback",
            "load_generator": "separate process, raw HTTP/1.1 keep-alive on uvloop, same machine",
        },
        "results": results,
        "targets": {"post_paced_p99_ms": TARGET_POST_P99_MS, "get_requests_per_s": TARGET_GET_RPS},
        "met": {
            "post_paced_p99": results["post_paced"]["p99_ms"] < TARGET_POST_P99_MS,
            "get_requests_per_s": results["get_saturated"]["requests_per_s"] >= TARGET_GET_RPS,
        },
    }
    print(json.dumps(record, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"api-{args.machine}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
