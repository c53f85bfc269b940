"""End to end: `python -m service.serve` (private Redis, real uvicorn, real CPU worker with the tiny
model) driven over HTTP, by the `openai` client and by the `vmoba` CLI; then Ctrl-C stops it all.

One stack for the module (starting it loads and warms the tiny pipeline once).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from stack import ROOT, children_of, decode, running, sse_events

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    # The default tiny twin and an image-to-video one (Wan 2.2 TI2V), on one CPU worker.
    with running(tmp, MODEL="tiny,tiny-wan2.2-ti2v") as s:
        yield s


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


def test_native_flow(stack, http, tmp_path):
    body = {
        "prompt": "a lighthouse in a storm",
        "num_frames": 9,
        "width": 64,
        "height": 48,
        "num_inference_steps": 3,
        "fps": 8,
        "seed": 1234,
    }
    r = http.post("/generate", json=body)
    assert r.status_code == 202
    job_id = r.json()["id"]

    events = sse_events(f"{stack.url}/jobs/{job_id}/events")
    names = [e for e, _ in events]
    assert names[0] == "snapshot" and names[-1] == "completed"
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3
    progress = [d["progress"] for _, d in events]
    assert progress == sorted(progress) and progress[-1] == 100

    job = http.get(f"/jobs/{job_id}").json()
    assert (
        job["status"] == "completed" and job["seed"] == 1234 and job["model"] == "tiny-wan2.1-t2v"
    )
    assert job["timings"]["denoising_s"] > 0 and job["worker"]
    assert job["density"] is None or 0 < job["density"] <= 1

    video = http.get(f"/jobs/{job_id}/video")
    assert video.status_code == 200
    assert decode(video.content, tmp_path) == (9, 64, 48, 8.0)
    part = http.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == video.content[100:200]
    assert http.get(f"/jobs/{job_id}/thumbnail").content[:2] == b"\xff\xd8"
    assert job_id in [j["id"] for j in http.get("/jobs").json()["data"]]

    assert http.delete(f"/jobs/{job_id}").json()["deleted"] is True
    assert http.get(f"/jobs/{job_id}").status_code == 404
    assert http.get(f"/jobs/{job_id}/video").status_code == 404


def test_cancel_a_running_job(stack, http):
    # A long job: 100 steps at 256x256 takes far longer than the test waits.
    job_id = http.post(
        "/generate",
        json={
            "prompt": "slow",
            "num_inference_steps": 100,
            "width": 256,
            "height": 256,
            "num_frames": 17,
        },
    ).json()["id"]
    deadline = time.time() + 60
    while http.get(f"/jobs/{job_id}").json()["step"] < 1:
        assert time.time() < deadline, "the job never started"
        time.sleep(0.1)
    r = http.post(f"/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202)
    deadline = time.time() + 30
    while (job := http.get(f"/jobs/{job_id}").json())["status"] == "in_progress":
        assert time.time() < deadline, "the worker did not stop"
        time.sleep(0.1)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    assert job["step"] < 100
    assert http.get(f"/v1/videos/{job_id}").json()["status"] == "failed"


def test_openai_client(stack, tmp_path):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create_and_poll(
            prompt="a paper boat", seconds="1", size="64x64", extra_body={"num_inference_steps": 2}
        )
        assert video.status == "completed" and video.progress == 100, video
        assert (video.seconds, video.size, video.model) == ("1", "64x64", "tiny-wan2.1-t2v")
        data = client.videos.download_content(video.id).read()
        assert decode(data, tmp_path) == (17, 64, 64, 16.0)
        thumb = client.videos.download_content(video.id, variant="thumbnail").read()
        assert thumb[:2] == b"\xff\xd8"
        assert video.id in [v.id for v in client.videos.list(limit=5).data]
        assert client.videos.retrieve(video.id).expires_at > video.created_at
        assert client.videos.delete(video.id).deleted


def test_openai_client_image_to_video(stack, tmp_path):
    """`videos.create(..., input_reference=open(png, "rb"))` with the real client makes a video."""
    image = tmp_path / "first.png"
    rng = np.random.default_rng(random.randrange(2**31))
    Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(image)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    with warnings.catch_warnings(), open(image, "rb") as f:
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create(
            model="tiny-wan2.2-ti2v",
            prompt="the boat sails off",
            seconds="1",
            size="64x64",
            input_reference=f,
            extra_body={"num_inference_steps": 2},
        )
        video = client.videos.poll(video.id, poll_interval_ms=200)
    assert video.status == "completed" and video.model == "tiny-wan2.2-ti2v", video
    assert decode(client.videos.download_content(video.id).read(), tmp_path) == (17, 64, 64, 16.0)
    job = httpx.get(f"{stack.url}/jobs/{video.id}").json()
    assert job["request"]["task"] == "i2v" and job["attention"]["sources"]["select"] == "model"


def test_cli(stack, tmp_path):
    out = tmp_path / "cli.mp4"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "generate",
            "a kite",
            "-o",
            str(out),
            "--frames",
            "5",
            "--size",
            "32x32",
            "--steps",
            "2",
            "--attention",
            "dense",
            "--url",
            stack.url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "100%" in r.stderr and f"saved {out}" in r.stderr
    final = json.loads(r.stdout)
    assert final["status"] == "completed" and final["request"]["attention"]["backend"] == "dense"
    assert decode(out, tmp_path)[:3] == (5, 32, 32)

    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", "x", "--frames", "6", "--url", stack.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "4k+1" in bad.stderr


def completed_count(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('vmoba_jobs_finished_total{status="completed"}'):
            return float(line.split()[-1])
    return 0.0


def test_metrics_after_a_job(stack, http):
    before = completed_count(http)
    job_id = http.post(
        "/generate",
        json={
            "prompt": "count",
            "num_frames": 5,
            "width": 32,
            "height": 32,
            "num_inference_steps": 1,
        },
    ).json()["id"]
    deadline = time.time() + 60
    while http.get(f"/jobs/{job_id}").json()["status"] != "completed":
        assert time.time() < deadline
        time.sleep(0.1)
    text = http.get("/metrics").text
    assert completed_count(http) == before + 1
    assert "vmoba_live_workers 1.0" in text
    assert 'vmoba_job_stage_seconds_count{stage="denoising"}' in text


def test_ctrl_c_stops_everything(stack):
    """Runs last in this module: SIGINT to the supervisor stops Redis, the API and the workers."""
    kids = children_of(stack.proc.pid)
    assert len(kids) >= 4, "redis, uvicorn (+ its workers), the launcher and a worker"
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(timeout=60) == 0
    time.sleep(0.5)
    alive = [
        pid
        for pid in kids
        if Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    ]
    assert alive == [], f"left running: {alive}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.url}/healthz", timeout=1)
