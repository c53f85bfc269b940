"""The random-weight full-size architectures (`MODEL=wan2.1-1.3b-random`): real sizes checked on
the meta device, and the builder run end to end on a scaled-down copy on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.random_model import ARCHITECTURES, UMT5_XXL, WAN21_T2V_1_3B, build_random_pipeline


def test_full_size_architecture_has_the_published_parameter_counts():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    arch = ARCHITECTURES["wan2.1-1.3b-random"]
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**arch["transformer"])
        text_encoder = UMT5EncoderModel(UMT5Config(**arch["text_encoder"]))
        vae = AutoencoderKLWan(**arch["vae"])
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(transformer) == 1_418_996_800  # Wan2.1-T2V-1.3B
    assert count(text_encoder) == 5_680_910_336  # umt5-xxl encoder
    assert count(vae) == 126_892_531  # Wan 2.1 VAE
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == 1536


def scaled_down():
    return {
        "small": dict(
            transformer={
                **WAN21_T2V_1_3B,
                "num_layers": 3,
                "num_attention_heads": 2,
                "ffn_dim": 64,
                "text_dim": 64,
            },
            text_encoder={
                **UMT5_XXL,
                "num_layers": 2,
                "d_model": 64,
                "d_ff": 128,
                "num_heads": 4,
                "d_kv": 16,
                "vocab_size": 512,
            },
            vae=dict(base_dim=8),
            flow_shift=3.0,
        )
    }


def test_builder_makes_a_working_deterministic_pipeline():
    a = build_random_pipeline("small", device="cpu", architectures=scaled_down(), seed=3)
    b = build_random_pipeline("small", device="cpu", architectures=scaled_down(), seed=3)
    for pa, pb in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb)
    weights = a.transformer.blocks[0].ffn.net[0].proj.weight
    assert abs(float(weights.std()) - 0.02) < 0.005  # trained-scale init
    out = a(
        prompt="a lighthouse at dusk",
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert out.shape == (1, 5, 32, 48, 3) and np.isfinite(out).all() and out.std() > 0
    with pytest.raises(ValueError, match="unknown random architecture"):
        build_random_pipeline("wan9-random", device="cpu")
