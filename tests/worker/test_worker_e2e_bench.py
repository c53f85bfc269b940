"""`bench/worker_e2e.py` dry-run on the CPU with the tiny model, so the GPU run it exists for
does not fail on its harness (private Redis, launcher, job, checks, JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from worker_helpers import ROOT

pytestmark = pytest.mark.timeout(180)


def test_cpu_dry_run_writes_a_complete_record(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.worker_e2e",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "worker-e2e-cpu.json").read_text())
    assert record["status"] == "completed" and record["gpu"] == "cpu"
    assert record["video"]["ok"] and record["video"]["frames"] == 9
    assert {
        "queued_s",
        "text_encoder_s",
        "denoising_s",
        "decoding_s",
        "encoding_s",
        "total_s",
    } <= set(record["timings"])
    assert len(record["step_s_from_events"]) == 3 and record["step_ms"] > 0
    assert 0 < record["density"] <= 1 and record["worker_ready_s"] > 0


def test_a_carried_redis_server_that_is_not_there_fails_clearly(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.worker_e2e",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--redis-server",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "is not an executable file" in out.stderr
    assert not list(tmp_path.glob("*.json"))
