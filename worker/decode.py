"""The VAE decode of a Wan pipeline's latents, handed on frame chunk by frame chunk.

The Wan VAE decodes one latent frame at a time (a causal decoder with a feature cache:
`AutoencoderKLWan._decode`), so the first video frames exist long before the last. `stream_decode`
makes the same calls in the same order and gives each latent frame's video frames (1, then 4 a
latent frame) to `on_frames` as `uint8` `[f, H, W, 3]` as soon as they reach the host, so an mp4
encoder (`worker.video.Mp4Writer`) works while the GPU decodes the rest:

```python
out = pipe(..., output_type="latent")
with Mp4Writer(path, fps=16) as mp4:
    frames = stream_decode(pipe, out.frames, mp4.write)   # uint8 [F, H, W, 3], all of them
    video = mp4.finish()
```

The frames are bit-identical to `pipe(..., output_type="pt")` followed by
`worker.video.device_frames_to_uint8`: the pipelines' latent de-normalisation, the decoder calls,
unpatchify (Wan 2.2's VAE), clamp and the video processor's post-processing are the same
operations on the same values; only the concatenation of the chunks is left out. A VAE this loop
does not know (another class, tiling, slicing or offloading hooks, a batch of several videos)
is decoded by its own `decode` in one piece and handed on as one chunk.

On CUDA each chunk's copy to the host is asynchronous and waited for only once the next latent
frame's decode has been queued, so the GPU does not idle while the host takes a chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import closing
from typing import Optional

import numpy as np
import torch

from .video import frames_to_uint8_on_device

FrameSink = Callable[[np.ndarray], None]


def streamable(vae, latents: torch.Tensor) -> bool:
    """Whether `vae` decodes `latents` frame by frame the way `decoded_chunks` repeats: the
    diffusers Wan VAE itself (not a subclass), one video, no tiling, slicing or offload hooks."""
    from diffusers.models import AutoencoderKLWan

    return (
        type(vae) is AutoencoderKLWan
        and latents.shape[0] == 1
        and not vae.use_tiling
        and not vae.use_slicing
        and not any(
            getattr(m, "_hf_hook", None) is not None
            or getattr(m, "_diffusers_hook", None) is not None
            for m in vae.modules()
        )
    )


def denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """What the Wan pipelines do to their latents before `vae.decode` (WanPipeline,
    WanImageToVideoPipeline, diffusers 0.42.1): on the VAE's device and in its dtype,
    `latents * std + mean` written as `latents / (1 / std) + mean`, the same rounding."""
    from diffusers.utils.torch_utils import get_module_execution_device

    latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(
        latents.device, latents.dtype
    )
    return latents / inv_std + mean


def decoded_chunks(pipe, latents: torch.Tensor) -> Generator[torch.Tensor, None, None]:
    """The decoded video of `latents` (`[1, C, T, h, w]`, the pipeline's `output_type="latent"`)
    as `[1, f, 3, H, W]` chunks in `[0, 1]` on the VAE's device (`output_type="pt"` frames):
    one a latent frame when `streamable`, else the whole video at once."""
    vae = pipe.vae
    z = denormalize(vae, latents)
    if not streamable(vae, z):
        video = vae.decode(z, return_dict=False)[0]
        yield pipe.video_processor.postprocess_video(video, output_type="pt")
        return
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    # AutoencoderKLWan._decode, its loop body run one latent frame at a time
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(
                x[:, :, i : i + 1, :, :],
                feat_cache=vae._feat_map,
                feat_idx=vae._conv_idx,
                first_chunk=i == 0,
            )
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            out = torch.clamp(out, min=-1.0, max=1.0)
            yield pipe.video_processor.postprocess_video(out, output_type="pt")
    finally:
        vae.clear_cache()


def stream_decode(pipe, latents: torch.Tensor, on_frames: Optional[FrameSink] = None) -> np.ndarray:
    """Decode `latents` (see the module docstring), calling `on_frames` with each chunk of
    `uint8` `[f, H, W, 3]` frames once it is on the host (a chunk must not be changed after);
    returns all of them, `[F, H, W, 3]`. `ValueError` if the decode gave NaN or infinite values
    (found when the chunk reaches the host: earlier chunks have been handed on)."""
    chunks: list[np.ndarray] = []

    def hand_on(pending) -> None:
        frames, finite, copied = pending
        if copied is not None:
            copied.synchronize()
        if not bool(finite):
            raise ValueError("frames contain NaN or infinite values")
        host = frames.numpy()
        chunks.append(host)
        if on_frames is not None:
            on_frames(host)

    pending = None
    # closing: a sink that raises (a cancel) frees the decoder's feature cache at once
    with torch.no_grad(), closing(decoded_chunks(pipe, latents)) as videos:
        for video in videos:
            frames, finite = frames_to_uint8_on_device(video)
            copied = None
            if frames.device.type == "cuda":
                # pinned host memory, filled behind the next latent frame's decode
                frames = frames.to("cpu", non_blocking=True)
                finite = finite.to("cpu", non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            if pending is not None:
                hand_on(pending)
            pending = (frames, finite, copied)
        assert pending is not None, "a video has at least one latent frame"
        hand_on(pending)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
