"""Fine-tuning with VMoBA installed (tiny Wan transformer, CPU, reference kernels): activation
checkpointing recomputes blocks after the transformer's forward has returned, so it must keep
the call's VMoBA context (`vmoba.diffusers.enable_gradient_checkpointing`)."""

from __future__ import annotations

import pytest
import torch

from vmoba.diffusers import AttentionSettings, enable_gradient_checkpointing, install_vmoba

SPARSE = AttentionSettings(
    select="threshold_global", threshold=0.05, dense_steps=0.0, kernel="reference"
)


@pytest.fixture
def model():
    from worker.random_model import build_random_transformer
    from worker.tiny_model import TRANSFORMER_CONFIG

    m = build_random_transformer(TRANSFORMER_CONFIG, device="cpu", dtype=torch.float32)
    return m.train().requires_grad_(True)


def parameter_grads(model, latent, text):
    model.zero_grad(set_to_none=True)
    out = model(
        hidden_states=latent,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=text,
        return_dict=False,
    )[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_sparse_training_matches_plain_backward(seed, model):
    from worker.tiny_model import TRANSFORMER_CONFIG as config

    latent = torch.randn(1, config["in_channels"], 3, 10, 14)  # token grid (3, 5, 7)
    text = torch.randn(1, 8, config["text_dim"])
    handle = install_vmoba(model, SPARSE)
    try:
        plain = parameter_grads(model, latent, text)
        enable_gradient_checkpointing(model)
        checkpointed = parameter_grads(model, latent, text)
        handle.remove()
        dense = parameter_grads(model, latent, text)
    finally:
        handle.remove()
    attn = [n for n in plain if ".attn1.to_q." in n]
    assert attn and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-10, rtol=1e-5)
    # the sparse gradients are not the dense ones (VMoBA was really in the loop)
    assert all((plain[n] - dense[n]).norm() > 0.1 * dense[n].norm() for n in attn)
