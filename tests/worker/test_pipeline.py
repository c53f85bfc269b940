"""The tiny offline Wan pipeline and `worker.pipeline` (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.pipeline import describe, is_tiny, load_pipeline
from worker.tiny_model import build_tiny_pipeline, build_tokenizer

# A pipeline loaded from disk holds the same weights, but safetensors are memory-mapped at other
# addresses than freshly allocated tensors and CPU matmul kernels may round differently for them
# (measured 2e-6 on the video). Copied into fresh memory, the output is bit-identical.
RELOAD_ATOL = 1e-5


def generate(pipe, seed=3, **kw):
    args = dict(
        prompt="a lighthouse at dusk",
        num_frames=17,
        height=64,
        width=64,
        num_inference_steps=4,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    args.update(kw)
    return pipe(**args).frames


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


def _state(pipe):
    return {
        f"{part}.{k}": v
        for part in ("text_encoder", "transformer", "vae")
        for k, v in getattr(pipe, part).state_dict().items()
    }


def test_tiny_pipeline_is_deterministic_per_seed_and_leaves_the_global_rng():
    rng = torch.random.get_rng_state()
    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_generation_shape_and_repeatability(tiny):
    video = generate(tiny)
    assert video.shape == (1, 17, 64, 64, 3)
    assert video.dtype == np.float32 and 0.0 <= video.min() and video.max() <= 1.0
    assert video.std() > 0.01  # not a constant image
    np.testing.assert_array_equal(generate(tiny), video)
    assert not np.array_equal(generate(tiny, seed=4), video)


@pytest.mark.parametrize("frames, height, width", [(17, 64, 64), (9, 48, 80), (1, 32, 32)])
def test_tiny_model_maps_requests_to_the_real_latent_grid(tiny, frames, height, width):
    """VAE 4x temporal, 8x spatial; patch (1, 2, 2): grid (1 + (F-1)/4, H/16, W/16)."""
    seen = []
    hook = tiny.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True
    )
    try:
        video = generate(tiny, num_frames=frames, height=height, width=width, num_inference_steps=1)
    finally:
        hook.remove()
    latent = seen[0]
    patch = tiny.transformer.config.patch_size
    grid = (latent[2] // patch[0], latent[3] // patch[1], latent[4] // patch[2])
    assert grid == (1 + (frames - 1) // 4, height // 16, width // 16)
    assert video.shape == (1, frames, height, width, 3)
    assert len(seen) == 2  # guidance on: two transformer calls for the one step


def test_saved_pipeline_loads_back_and_generates_the_same_video(tiny, tmp_path):
    from diffusers import WanPipeline

    tiny.save_pretrained(tmp_path)
    loaded = WanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    original, reloaded = _state(tiny), _state(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert loaded.tokenizer("snow ☃").input_ids == tiny.tokenizer("snow ☃").input_ids
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.scheduler.config) == public(tiny.scheduler.config)

    video = generate(tiny)
    np.testing.assert_allclose(generate(loaded), video, rtol=0, atol=RELOAD_ATOL)
    with torch.no_grad():
        for part in ("text_encoder", "transformer", "vae"):
            for p in getattr(loaded, part).parameters():
                p.data = p.data.clone()
    np.testing.assert_array_equal(generate(loaded), video)

    # the non-tiny path of load_pipeline reads the same directory (fp32 on the CPU)
    from_dir = load_pipeline(str(tmp_path))
    assert all(torch.equal(original[k], v) for k, v in _state(from_dir).items())
    info = describe(from_dir)
    assert info["model"] == str(tmp_path) and info["tiny"] is False
    assert info["vae"]["dtype"] == "float32" and info["transformer"]["dtype"] == "float32"


def test_describe_the_tiny_model(tiny):
    info = describe(tiny)
    assert info["model"] == "tiny" and info["tiny"] is True and "random" in info["note"]
    t = info["transformer"]
    assert t["num_layers"] >= 3 and t["patch_size"] == [1, 2, 2]
    assert t["dim"] == t["num_attention_heads"] * t["attention_head_dim"]
    assert info["param_count"] == sum(
        p.numel()
        for part in ("text_encoder", "transformer", "vae")
        for p in getattr(tiny, part).parameters()
    )
    assert info["vae"]["scale_factor_temporal"] == 4 and info["vae"]["scale_factor_spatial"] == 8
    import json

    json.dumps(info)  # sidecar-ready


def test_tokenizer_handles_any_text_like_t5():
    tok = build_tokenizer()
    ids = tok("Zoë's café, 東京 🌸", padding="max_length", max_length=40, truncation=True).input_ids
    n = len("Zoë's café, 東京 🌸".encode())
    assert ids[n] == tok.eos_token_id == 1 and ids[n + 1 :] == [0] * (40 - n - 1)
    assert tok.decode(ids, skip_special_tokens=True) == "Zoë's café, 東京 🌸"


def test_is_tiny():
    assert is_tiny("tiny") and is_tiny(" TINY ")
    assert not is_tiny("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") and not is_tiny(None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "tiny", "dtype": "bf16"}, "fp32"),
        ({"model": "tiny", "dtype": "int8"}, "dtype"),
        ({"model": "/no/such/model/dir"}, "does not exist"),
        ({"model": ""}, "model"),
        ({"model": "tiny", "device": "warp-drive"}, "device"),
    ],
)
def test_bad_load_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_pipeline(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_pipeline("tiny", device="cuda")
