"""Durable job state, for real: `python -m service.serve` (its private redis-server with an
append-only file, uvicorn, the worker launcher and a CPU worker with the tiny model), and the
redis-server killed with SIGKILL right after jobs are accepted and again after a job completed.
The stack restarts Redis on the same port with the same file: nothing is lost, nothing stuck,
no video deleted, and the worker rides out the restarts without failing its job."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.registry import StartedJobRegistry
from stack import Stack, children_of, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# About 50 ms a step on the tiny model: a job runs for a second or two.
JOB = {"prompt": "durable", "num_frames": 5, "width": 32, "height": 32, "num_inference_steps": 30}


def redis_server_of(stack: Stack) -> tuple[int, int]:
    """`(pid, port)` of the stack's private redis-server."""
    port = int(stack.log.read_text().split("private redis-server on port ")[1].split()[0])
    for pid in children_of(stack.proc.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if "(redis-server)" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
            return pid, port
    raise AssertionError("no redis-server under the stack")


def kill_redis(stack: Stack) -> float:
    """SIGKILL the stack's redis-server; returns once the stack has started a new one that
    answers (on the same port), after how many seconds."""
    pid, port = redis_server_of(stack)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = killed + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, redis.RedisError):
            if redis_server_of(stack)[0] != pid and client.ping():
                return time.monotonic() - killed
        time.sleep(0.1)
    raise AssertionError("the stack did not restart Redis:\n" + stack.log.read_text()[-3000:])


def get(http: httpx.Client, path: str, timeout_s: float = 30) -> httpx.Response:
    """GET, waiting out the 503s of a Redis restart."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = http.get(path)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def wait_done(http: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = get(http, f"/jobs/{job_id}").json()
        if job.get("status") in ("completed", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.2)


@pytest.fixture
def stack(tmp_path):
    with running(tmp_path, JANITOR_INTERVAL_S="1", LOST_JOB_RETRIES="0") as s:
        yield s


def last_event(url: str, job_id: str, opened: threading.Event, out: list) -> None:
    """Follow a job's event stream to its end (`opened` once its first event came); append the
    name of its last event."""
    name = None
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.split(": ", 1)[1]
                opened.set()
    out.append(name)


def burst(url: str, path: str, n: int = 8, each: int = 5) -> list[int]:
    """Status codes of `n` clients asking `path` `each` times at once (several pooled
    connections of the API, each of which a restart left stale)."""
    codes: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            codes.extend(http.get(path).status_code for _ in range(each))

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_kill_9_of_redis_loses_nothing_and_leaves_nothing_stuck(stack, tmp_path):
    data = tmp_path / "data"
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        # 1. Jobs accepted, then Redis killed while the first one runs: every one completes,
        # on the same worker process (it waits for Redis instead of failing the job).
        accepted = []
        for i in range(4):
            r = http.post("/generate", json={**JOB, "seed": i})
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
        deadline = time.monotonic() + 30
        while (job := http.get(f"/jobs/{accepted[0]}").json())["step"] < 1:
            assert time.monotonic() < deadline, job
            time.sleep(0.02)
        assert job["status"] == "in_progress" and job["step"] < JOB["num_inference_steps"]
        worker = job["worker"]
        assert burst(stack.url, f"/jobs/{accepted[0]}") == [200] * 40  # the pool fills up
        ends: list = []
        opened = threading.Event()
        follower = threading.Thread(target=last_event, args=(stack.url, accepted[-1], opened, ends))
        follower.start()
        assert opened.wait(10)
        outage_s = kill_redis(stack)
        follower.join(timeout=60)
        # The open stream ended with a final word, not a cut: `unavailable` (reconnect) if Redis
        # was gone when it looked, or the job's end if it came back in time.
        assert ends and ends[0] in ("unavailable", "completed"), ends
        jobs = [wait_done(http, job_id) for job_id in accepted]
        assert [j["status"] for j in jobs] == ["completed"] * 4, jobs
        assert [j["attempts"] for j in jobs] == [1] * 4, "nothing ran twice"
        assert {j["worker"] for j in jobs} == {worker}, "the worker rode the restart out"

        # 2. After a job completed, Redis killed again: the record and the video are still there.
        first = accepted[0]
        video = get(http, f"/jobs/{first}/video")
        assert video.status_code == 200 and len(video.content) > 1000
        kill_redis(stack)
        back = time.monotonic()
        job = get(http, f"/jobs/{first}").json()
        # Once Redis answers, so does the API, on every pooled connection: no stale-connection
        # 503s afterwards.
        assert time.monotonic() - back < 5
        assert burst(stack.url, f"/jobs/{first}") == [200] * 40
        assert job["status"] == "completed" and job["timings"]["denoising_s"] > 0
        assert get(http, f"/jobs/{first}/video").content == video.content
        assert (data / "jobs" / first / "meta.json").is_file()
        listed = {j["id"] for j in get(http, "/jobs", timeout_s=10).json()["data"]}
        assert set(accepted) <= listed

        # 3. The worker and the API go on: a job submitted after the restarts completes.
        r = http.post("/generate", json={**JOB, "seed": 99})
        assert r.status_code == 202, r.text
        assert wait_done(http, r.json()["id"])["status"] == "completed"

    # Nothing stuck anywhere: no record waiting or running, RQ's queue and registries empty.
    _, port = redis_server_of(stack)
    client = redis.Redis(port=port)
    assert client.zcard("vmoba:queued") == 0 and client.zcard("vmoba:running") == 0
    queue = Queue("vmoba:tiny-wan2.1-t2v", connection=client)
    started = StartedJobRegistry(queue=queue)
    deadline = time.monotonic() + 10  # RQ's own bookkeeping follows our record's completion
    while started.get_job_ids(cleanup=False) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.count == 0 and started.get_job_ids(cleanup=False) == []
    assert any((data / "redis").glob("appendonly*")), "Redis writes an append-only file"
    log = stack.log.read_text()
    assert log.count("redis ended (signal SIGKILL)") == 2, log[-3000:]
    assert outage_s < 10
    assert "ended after" not in log, "no worker process died"
