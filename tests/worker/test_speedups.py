"""`worker.speedups` on the tiny pipeline (CPU): what `COMPILE` and `VAE_DTYPE` do."""

from __future__ import annotations

import pytest
import torch

from worker.settings import WorkerSettings
from worker.speedups import apply_speedups, compile_enabled, vae_dtype


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [(None, "cpu", False), (None, "cuda", True), (False, "cuda", False), (True, "cpu", True)],
)
def test_compile_default_follows_the_device(setting, device, expected):
    assert compile_enabled(setting, device) is expected


def test_settings_read_compile_and_vae_dtype(monkeypatch):
    monkeypatch.setenv("COMPILE", "0")
    monkeypatch.setenv("VAE_DTYPE", "fp32")
    settings = WorkerSettings()
    assert settings.COMPILE is False and settings.VAE_DTYPE == "fp32"
    monkeypatch.delenv("COMPILE")
    assert WorkerSettings().COMPILE is None
    assert vae_dtype("auto", "cuda") == torch.bfloat16
    assert vae_dtype("auto", "cpu") == torch.float32


def test_apply_speedups_compiles_each_shared_module_once():
    """Two tasks sharing one transformer and VAE: every block compiled, the VAE cast once."""
    from worker.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    done = apply_speedups(
        {"t2v": pipe, "again": pipe},
        device="cpu",
        compile=True,
        vae="bf16",
        compile_options={"backend": "eager"},
    )
    assert done == {"compile": True, "vae_dtype": "bfloat16"}
    assert all(b._compiled_call_impl is not None for b in pipe.transformer.blocks)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    off = build_tiny_pipeline(0)
    assert apply_speedups({"t2v": off}, device="cpu", compile=None, vae="auto")["compile"] is False
    assert all(b._compiled_call_impl is None for b in off.transformer.blocks)
    assert {p.dtype for p in off.vae.parameters()} == {torch.float32}
