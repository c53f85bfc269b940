"""The streamed VAE decode (`worker.decode`): for every tiny family and task, the frames are
bit-identical to the pipeline's own decode (`output_type="pt"` + `device_frames_to_uint8`) and
come one latent frame at a time; a VAE the loop does not know is decoded in one piece (CPU,
seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from contract.models import TINY_MODELS
from worker.decode import decoded_chunks, stream_decode, streamable
from worker.families import build_pipelines, call_kwargs, prompt_kwargs
from worker.video import device_frames_to_uint8

CASES = [(spec, task) for spec in TINY_MODELS for task in spec.tasks]
# Frame counts (4k + 1, as the pipelines take them) and sizes (not square; multiples of 32 for
# the Wan 2.2 VAE's 16x compression times its 2x2 patch), varied over the cases.
FRAMES = (9, 5, 13)
SIZES = {"wan2.2-ti2v": (64, 96)}


def with_latent_statistics(pipe, seed: int):
    """The pipeline with the real VAEs' kind of per-channel latent mean and std (the twins'
    are 0 and 1, which would leave the de-normalisation untested)."""
    rng = np.random.default_rng(seed)
    z = pipe.vae.config.z_dim
    pipe.vae.register_to_config(
        latents_mean=rng.normal(0.0, 0.5, z).tolist(), latents_std=rng.uniform(0.5, 3.0, z).tolist()
    )
    return pipe


def video_pair(spec, pipe, task, frames, *, seed: int):
    """`(video, latents)`: one seeded call decoded by the pipeline (`output_type="pt"`, today's
    worker path before `device_frames_to_uint8`), and the same call's latents."""
    height, width = SIZES.get(spec.family, (32, 48))
    rng = np.random.default_rng(seed)
    image = None
    if task == "i2v":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            do_classifier_free_guidance=True,
            device=pipe._execution_device,
            **prompt_kwargs(spec),
        )
    extra = call_kwargs(spec, task, guidance_scale=5.0, image=image, width=width, height=height)

    def run(output_type):
        return pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=2,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
            output_type=output_type,
            **extra,
        ).frames

    return run("pt"), run("latent")


@pytest.mark.parametrize("spec,task", CASES, ids=[f"{spec.id}-{task}" for spec, task in CASES])
def test_streamed_frames_are_bit_identical_and_come_per_latent_frame(spec, task, seed):
    frames = FRAMES[CASES.index((spec, task)) % len(FRAMES)]
    pipe = with_latent_statistics(build_pipelines(spec, seed=0)[task], seed)
    video, latents = video_pair(spec, pipe, task, frames, seed=seed)
    plain = device_frames_to_uint8(video)
    assert streamable(pipe.vae, latents)
    # before the uint8 rounding (which would hide a float rounding difference): the same floats
    assert torch.equal(torch.cat(list(decoded_chunks(pipe, latents)), dim=1), video)
    chunks: list[np.ndarray] = []
    streamed = stream_decode(pipe, latents, chunks.append)
    assert streamed.dtype == np.uint8 and streamed.flags.c_contiguous
    assert streamed.shape == plain.shape and plain.shape[0] == frames
    assert np.array_equal(streamed, plain)
    assert len(np.unique(plain)) > 32  # a real picture, not a constant or clipped one
    # the causal VAE's chunks: 1 frame, then 4 a latent frame; together, the returned frames
    assert [len(c) for c in chunks] == [1] + [4] * ((frames - 1) // 4)
    assert np.array_equal(np.concatenate(chunks), streamed)


def test_bf16_vae_is_bit_identical_too(seed):
    """The worker's GPU VAE runs in bf16: the de-normalisation must round as the pipeline's."""
    spec = TINY_MODELS[0]
    pipe = with_latent_statistics(build_pipelines(spec, seed=0)["t2v"], seed)
    pipe.vae.to(torch.bfloat16)
    video, latents = video_pair(spec, pipe, "t2v", 9, seed=seed)
    assert torch.equal(torch.cat(list(decoded_chunks(pipe, latents)), dim=1), video)
    assert np.array_equal(stream_decode(pipe, latents), device_frames_to_uint8(video))


@pytest.mark.parametrize("change", ["tiling", "slicing", "subclass"])
def test_a_vae_the_loop_does_not_know_is_decoded_whole(change, seed):
    from diffusers.models import AutoencoderKLWan

    spec = TINY_MODELS[0]
    pipe = with_latent_statistics(build_pipelines(spec, seed=0)["t2v"], seed)
    vae = pipe.vae
    if change == "tiling":
        vae.enable_tiling()
    elif change == "slicing":
        vae.enable_slicing()
    else:  # stands for a class the loop does not know
        vae.__class__ = type("WanVAESubclass", (AutoencoderKLWan,), {})
    video, latents = video_pair(spec, pipe, "t2v", 9, seed=seed)
    assert not streamable(vae, latents)
    chunks: list[np.ndarray] = []
    assert np.array_equal(
        stream_decode(pipe, latents, chunks.append), device_frames_to_uint8(video)
    )
    assert [len(c) for c in chunks] == [9]


class Stop(Exception):
    """What a cancelled job raises from its sink."""


def test_a_sink_that_raises_stops_the_decode_and_clears_the_cache(seed):
    spec = TINY_MODELS[0]
    pipe = with_latent_statistics(build_pipelines(spec, seed=0)["t2v"], seed)
    _, latents = video_pair(spec, pipe, "t2v", 13, seed=seed)
    seen: list[int] = []

    def cancel_after_two(frames):
        seen.append(len(frames))
        if len(seen) == 2:
            raise Stop()

    with pytest.raises(Stop):
        stream_decode(pipe, latents, cancel_after_two)
    assert seen == [1, 4]
    assert all(f is None for f in pipe.vae._feat_map)  # no decoder activations kept


@pytest.mark.gpu
@pytest.mark.parametrize("model_id", ["tiny-wan2.1-t2v", "tiny-wan2.2-ti2v"])
def test_on_cuda_with_a_bf16_vae_the_host_copies_overlap_and_stay_bit_identical(model_id, seed):
    """The CUDA path: chunks copied to pinned memory behind the next latent frame's decode."""
    from contract.models import get_model

    spec = get_model(model_id)
    pipe = with_latent_statistics(build_pipelines(spec, seed=0)["t2v"], seed).to("cuda")
    pipe.vae.to(torch.bfloat16)
    video, latents = video_pair(spec, pipe, "t2v", 13, seed=seed)
    chunks: list[np.ndarray] = []
    streamed = stream_decode(pipe, latents, chunks.append)
    assert np.array_equal(streamed, device_frames_to_uint8(video))
    assert [len(c) for c in chunks] == [1, 4, 4, 4]
