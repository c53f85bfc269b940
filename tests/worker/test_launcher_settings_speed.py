"""Launcher planning and restart policy, worker settings, and the speed model behind timeouts."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from worker_helpers import ROOT

from contract.speed import Shape, SpeedModel, latent_tokens
from worker.launcher import EXIT_RESTART, Launcher, Slot, detect_gpus, plan_slots
from worker.settings import WorkerSettings, parse_size


@pytest.mark.parametrize(
    "visible,expected",
    [
        ("0,1,3", ["0", "1", "3"]),
        ("2", ["2"]),
        ("", []),
        ("-1", []),
        ("0,-1,1", ["0"]),
        ("GPU-1234,GPU-5678", ["GPU-1234", "GPU-5678"]),
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(visible, expected):
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": visible}) == expected


def test_one_worker_per_gpu_each_seeing_only_its_own():
    slots = plan_slots(
        WorkerSettings(MODEL="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), {"CUDA_VISIBLE_DEVICES": "4,5"}
    )
    assert [(s.label, s.env) for s in slots] == [
        ("gpu4", {"CUDA_VISIBLE_DEVICES": "4", "WORKER_DEVICE": "cuda"}),
        ("gpu5", {"CUDA_VISIBLE_DEVICES": "5", "WORKER_DEVICE": "cuda"}),
    ]


def test_no_gpu_means_one_cpu_worker_with_the_tiny_model():
    [slot] = plan_slots(
        WorkerSettings(MODEL="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), {"CUDA_VISIBLE_DEVICES": ""}
    )
    assert (
        slot.label == "cpu" and slot.env["MODEL"] == "tiny" and slot.env["WORKER_DEVICE"] == "cpu"
    )
    # Asking for the CPU on purpose keeps the model; asking for CUDA without one is an error.
    [slot] = plan_slots(
        WorkerSettings(WORKER_DEVICE="cpu", MODEL="/models/wan"), {"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert "MODEL" not in slot.env and slot.label == "cpu"
    with pytest.raises(SystemExit, match="no GPU"):
        plan_slots(WorkerSettings(WORKER_DEVICE="cuda"), {"CUDA_VISIBLE_DEVICES": ""})


def test_restart_policy(monkeypatch):
    """Deliberate restarts are immediate; crash loops back off; healthy runs restart in 1 s."""
    launcher = Launcher(WorkerSettings(RESTART_BACKOFF_MAX_S=8), [])
    now = [1000.0]
    monkeypatch.setattr("worker.launcher.time.monotonic", lambda: now[0])

    class Done:
        pid = 1

    def exit_with(slot, code, uptime):
        slot.proc, slot.started_at = Done(), now[0] - uptime
        launcher.on_exit(slot, code)
        return slot.start_after - now[0]

    slot = Slot("cpu", {})
    assert exit_with(slot, EXIT_RESTART, 2.0) == 0
    assert [exit_with(slot, 1, 2.0) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert exit_with(slot, -9, 3600.0) == 1 and slot.backoff.quick_failures == 0
    launcher.stopping = True
    slot.start_after = 0
    exit_with(slot, 0, 1.0)
    assert slot.proc is None and slot.start_after == 0  # stopping: no restart planned


def test_launcher_restarts_a_dying_command_and_stops_on_sigterm(tmp_path):
    """The real loop with a stand-in worker command that exits at once."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys, threading, os, signal\n"
        "from worker.launcher import Launcher, Slot\n"
        "from worker.settings import WorkerSettings\n"
        "s = WorkerSettings(RESTART_BACKOFF_MAX_S=0.2)\n"
        "slot = Slot('cpu', {})\n"
        "l = Launcher(s, [slot], command=[sys.executable, '-c', 'import sys; sys.exit(3)'])\n"
        "threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "rc = l.run()\n"
        "print('restarts', slot.restarts, 'codes', sorted({c for _, c in slot.history}), 'rc', rc)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    restarts = int(out.stdout.split()[1])
    assert restarts >= 3 and "codes [3] rc 0" in out.stdout


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("QUEUE_NAME", "high, vmoba")
    monkeypatch.setenv("MODEL", "tiny,tiny-wan2.2-ti2v")
    monkeypatch.setenv("ATTENTION_DEFAULTS", '{"temporal_chunk": 3}')
    monkeypatch.setenv("HEARTBEAT_TTL_S", "7.5")
    s = WorkerSettings()
    # Each queue name in priority order, for each model loaded (one queue per model).
    assert s.queues == [
        "high:tiny-wan2.1-t2v",
        "high:tiny-wan2.2-ti2v",
        "vmoba:tiny-wan2.1-t2v",
        "vmoba:tiny-wan2.2-ti2v",
    ]
    assert s.ATTENTION_DEFAULTS == {"temporal_chunk": 3}
    assert s.HEARTBEAT_TTL_S == 7.5
    monkeypatch.setenv("ATTENTION_DEFAULTS", "[1, 2]")
    with pytest.raises(ValueError, match="ATTENTION_DEFAULTS"):
        WorkerSettings()
    monkeypatch.delenv("ATTENTION_DEFAULTS")
    with pytest.raises(ValueError, match="4k\\+1"):
        WorkerSettings(WARMUP_SIZE="16x480x832")
    assert parse_size("81x480x832") == (81, 480, 832)


def test_latent_tokens_match_wan():
    assert latent_tokens(81, 480, 832) == 21 * 30 * 52 == 32760
    assert latent_tokens(81, 720, 1280) == 75600


def test_speed_model_estimates_and_learns():
    speed = SpeedModel(
        s_per_unit=1e-4, s_per_mpx=0.5, fixed_s=1.0, ref_tokens=latent_tokens(17, 480, 832)
    )
    small = Shape(17, 480, 832, 50, 5.0)
    big = Shape(81, 480, 832, 50, 5.0)
    no_cfg = Shape(17, 480, 832, 50, 1.0)
    assert speed.estimate_s(big) > 4 * speed.estimate_s(small)  # more than linear beyond ref
    assert speed.estimate_s(no_cfg) < speed.estimate_s(small)
    assert speed.timeout_s(small, factor=3, min_s=1000, max_s=2000) == 1000
    assert speed.timeout_s(big, factor=3, min_s=1, max_s=10) == 10
    # The first measurement replaces the prior; later ones are averaged in.
    rng = random.Random()
    true_unit = rng.uniform(1e-6, 1e-5)
    denoise = small.denoise_units(speed.ref_tokens) * true_unit
    speed.observe(small, denoise_s=denoise, decode_encode_s=2.0, fixed_s=0.5)
    assert speed.s_per_unit == pytest.approx(true_unit) and speed.samples == 1
    speed.observe(small, denoise_s=2 * denoise, decode_encode_s=2.0, fixed_s=0.5)
    assert true_unit < speed.s_per_unit < 2 * true_unit
