"""The diffusers pipelines of a registry model (`contract.models.ModelSpec`), one per task.

```python
from contract.models import get_model
from worker.families import build_pipelines, call_kwargs, prompt_kwargs

spec = get_model("tiny-wan2.2-ti2v")
pipes = build_pipelines(spec, device="cpu", seed=0)      # {"t2v": WanPipeline, "i2v": ...}
pos, neg = pipes["i2v"].encode_prompt(prompt, negative_prompt, True, **prompt_kwargs(spec))
video = pipes["i2v"](prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=17, height=128,
                     width=128, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                     **call_kwargs(spec, "i2v", image=image, guidance_scale=5.0)).frames
```

The pipelines of one spec share every component (one set of weights, one scheduler), so
`vmoba.diffusers.install_vmoba(pipes[any task])` once covers them all (it reads the step from
that pipeline's scheduler, which is every pipeline's) and the runtime's `flow_shift` change on
one scheduler is seen by all.

What differs per family (`FAMILIES`):

| family      | VAE (z, spatial)    | image condition                         | transformers       |
|-------------|---------------------|-----------------------------------------|--------------------|
| wan2.1-t2v  | Wan 2.1 (16, 8x)    | -                                       | 1                  |
| wan2.1-i2v  | Wan 2.1 (16, 8x)    | concatenated + CLIP ViT-H/14 tokens     | 1                  |
| wan2.2-ti2v | Wan 2.2 (48, 16x)   | first latent frame (`expand_timesteps`) | 1                  |
| wan2.2-a14b | Wan 2.1 (16, 8x)    | concatenated (I2V model), no CLIP       | 2 (boundary_ratio) |

and so what a call needs on top of the common arguments (`call_kwargs`):
- `i2v`: `image=` a PIL image of exactly `width x height` (`prepare_image` makes one);
- Wan 2.2 A14B: `guidance_scale_2=` for the low-noise expert, by default `guidance_scale`
  (the registry has no field for another; Wan's own T2V A14B config samples with 4.0 high-noise
  and 3.0 low-noise, its I2V A14B with 3.5 for both);
- Wan 2.2 TI2V 5B: nothing; `expand_timesteps=True` is set on both of its pipelines (per-token
  timesteps; its i2v replaces the first latent frame by the image's instead of concatenating).
- every family: `encode_prompt(..., max_sequence_length=512)` (`prompt_kwargs`), what the
  pipelines use for a `prompt=` string. Wan 2.1 I2V *needs* it: its cross-attention takes the
  text as the last 512 tokens of the context, with the image tokens before them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .pipeline import _MODEL_ATTR, check_device, load_hub_pipeline, resolve_dtype

if TYPE_CHECKING:
    from contract.models import ModelSpec

# The context length the Wan text encoders were trained with, and the one Wan 2.1 I2V's
# attention hard-codes (diffusers' WanAttnProcessor: `encoder_hidden_states.shape[1] - 512`).
TEXT_LENGTH = 512

# Which diffusers class serves which task.
TASK_PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}

# Where a pipeline records its spec (read by `worker.pipeline.describe`).
SPEC_ATTR = "_vmoba_serve_spec"


@dataclass(frozen=True)
class Family:
    """What the pipelines of a family are made of (beyond the sizes)."""

    vae: str  # "wan2.1" (z 16, 8x spatial) or "wan2.2" (z 48, 16x, residual, 2x2 patchify)
    image_encoder: bool  # a CLIP vision encoder whose tokens the cross-attention reads
    expand_timesteps: bool  # per-token timesteps; i2v through the first latent frame


FAMILIES = {
    "wan2.1-t2v": Family(vae="wan2.1", image_encoder=False, expand_timesteps=False),
    "wan2.1-i2v": Family(vae="wan2.1", image_encoder=True, expand_timesteps=False),
    "wan2.2-ti2v": Family(vae="wan2.2", image_encoder=False, expand_timesteps=True),
    "wan2.2-a14b": Family(vae="wan2.1", image_encoder=False, expand_timesteps=False),
}


def family_of(spec: ModelSpec) -> Family:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown model family {spec.family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[spec.family]


def image_conditioned(spec: ModelSpec) -> bool:
    """Whether the transformer takes the I2V condition concatenated to its input (mask + image
    latent: Wan 2.1 I2V and Wan 2.2 I2V A14B), rather than in the first frame (TI2V 5B)."""
    return "i2v" in spec.tasks and not family_of(spec).expand_timesteps


def _flow_shift(spec: ModelSpec) -> float:
    d = spec.defaults
    return d.flow_shift(d.width, d.height)


def build_pipelines(
    spec: ModelSpec, *, device="cpu", dtype=None, seed: int = 0, architectures=None
) -> dict:
    """`{task: pipeline}` for every task of `spec`, sharing one set of components, on `device`.

    - `weights == "hub"`: `from_pretrained(spec.hub_id)` (a hub id or a local directory; the
      transformer(s) and text encoder in `dtype`, default bf16 on CUDA and fp32 on the CPU; the
      VAE and any image encoder in fp32);
    - `"tiny"`: the family's tiny twin from `worker.tiny_model` (fp32 only, deterministic for
      `seed`; the caller's global RNG is left as it was);
    - `"random"`: the full-size architecture `worker.random_model.ARCHITECTURES[spec.id]` with
      random weights (or `architectures[spec.id]`: tests build scaled-down ones), created on
      `device` in `dtype`.

    `ValueError` for an unknown family or weights kind, a bad device or dtype, or a model whose
    VAE compression or patch differs from the spec's (which would give another latent grid).
    """
    traits = family_of(spec)
    torch_device = check_device(device)
    if spec.weights == "tiny":
        if resolve_dtype(dtype, "cpu") != torch.float32:
            raise ValueError(f"the tiny models run in fp32 only, got dtype={dtype!r}")
        from .tiny_model import build_tiny_components

        parts = build_tiny_components(
            seed=seed,
            vae=traits.vae,
            image_conditioned=image_conditioned(spec),
            image_encoder=traits.image_encoder,
            experts=2 if spec.boundary_ratio is not None else 1,
            flow_shift=_flow_shift(spec),
        )
    elif spec.weights == "random":
        from .random_model import ARCHITECTURES, build_random_components

        table = architectures if architectures is not None else ARCHITECTURES
        if spec.id not in table:
            raise ValueError(f"no random architecture for {spec.id!r}; known: {sorted(table)}")
        parts = build_random_components(
            table[spec.id], device=device, dtype=dtype, seed=seed, flow_shift=_flow_shift(spec)
        )
    elif spec.weights == "hub":
        if not spec.hub_id:
            raise ValueError(f"{spec.id!r} has no hub_id to load")
        pipe = load_hub_pipeline(
            spec.hub_id,
            spec.pipeline,
            dtype=resolve_dtype(dtype, device),
            image_encoder=traits.image_encoder,
        )
        parts = dict(pipe.components)
    else:
        raise ValueError(f"unknown weights kind {spec.weights!r} of {spec.id!r}")
    pipes = assemble(spec, parts)
    for pipe in pipes.values():
        pipe.to(torch_device)  # shared modules move once
        pipe.set_progress_bar_config(disable=True)
        setattr(pipe, _MODEL_ATTR, spec.hub_id if spec.weights == "hub" else spec.id)
        setattr(pipe, SPEC_ATTR, spec)
    return pipes


def assemble(spec: ModelSpec, parts: dict) -> dict:
    """`{task: pipeline}` from components (`tokenizer`, `text_encoder`, `vae`, `scheduler`,
    `transformer`, optional `transformer_2`, `image_encoder`, `image_processor`), the same
    objects in every pipeline; `boundary_ratio` from the spec, `expand_timesteps` from the
    family. Checks that the components give the spec's latent grid."""
    import diffusers

    traits = family_of(spec)
    if spec.pipeline not in TASK_PIPELINES.values():
        raise ValueError(f"{spec.id!r}: unknown pipeline class {spec.pipeline!r}")
    if (spec.boundary_ratio is None) != (parts.get("transformer_2") is None):
        raise ValueError(
            f"{spec.id!r}: boundary_ratio {spec.boundary_ratio} needs exactly two transformers"
        )
    if traits.image_encoder and parts.get("image_encoder") is None:
        raise ValueError(f"{spec.id!r}: the {spec.family} family needs an image encoder")
    _check_grid(spec, parts)
    common = dict(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        vae=parts["vae"],
        scheduler=parts["scheduler"],
        transformer=parts["transformer"],
        transformer_2=parts.get("transformer_2"),
        boundary_ratio=spec.boundary_ratio,
        expand_timesteps=traits.expand_timesteps,
    )
    pipes = {}
    for task in spec.tasks:
        cls = getattr(diffusers, TASK_PIPELINES[task])
        extra = {}
        if task == "i2v":
            extra = dict(
                image_encoder=parts.get("image_encoder"),
                image_processor=parts.get("image_processor"),
            )
        pipe = cls(**common, **extra)
        if task == "i2v":
            # diffusers' WanImageToVideoPipeline cleans prompts with ftfy without checking that it
            # is installed (WanPipeline checks; the worker does not depend on ftfy): its text
            # encoding, otherwise a copy of WanPipeline's, becomes WanPipeline's.
            pipe._get_t5_prompt_embeds = types.MethodType(
                diffusers.WanPipeline._get_t5_prompt_embeds, pipe
            )
        pipes[task] = pipe
    return pipes


def _check_grid(spec: ModelSpec, parts: dict) -> None:
    vae = parts["vae"].config
    vae_scale = (vae.scale_factor_temporal, vae.scale_factor_spatial)
    transformers = [parts["transformer"], parts.get("transformer_2")]
    patches = {tuple(t.config.patch_size) for t in transformers if t is not None}
    if vae_scale != tuple(spec.vae_scale) or patches != {tuple(spec.patch)}:
        raise ValueError(
            f"{spec.id!r}: the model has VAE compression {vae_scale} and patch "
            f"{sorted(patches)}, the spec says {spec.vae_scale} and {spec.patch}"
        )
    in_channels = vae.z_dim
    if image_conditioned(spec):
        in_channels = 2 * vae.z_dim + vae.scale_factor_temporal  # noise + mask + image latent
    for t in transformers:
        if t is not None and t.config.in_channels != in_channels:
            raise ValueError(
                f"{spec.id!r}: a transformer takes {t.config.in_channels} channels, "
                f"the {spec.family} family with this VAE needs {in_channels}"
            )


def prompt_kwargs(spec: ModelSpec) -> dict:
    """Keyword arguments of `pipe.encode_prompt(...)` for every pipeline of `spec`: the text
    context length (512 tokens, which Wan 2.1 I2V's attention requires; the same for all
    families so a prompt encodes the same everywhere)."""
    return {"max_sequence_length": TEXT_LENGTH}


def call_kwargs(
    spec: ModelSpec,
    task: str,
    *,
    guidance_scale: float,
    image=None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    guidance_scale_2: Optional[float] = None,
) -> dict:
    """What `pipes[task](...)` takes on top of the arguments every family shares (prompt
    embeddings, size, frames, steps, `guidance_scale`, generator, output type, callback).

    - `i2v`: `image` (a PIL image of `width x height` when those are given; `ValueError` when it
      is missing, or given for `t2v`);
    - two experts (Wan 2.2 A14B): `guidance_scale_2`, by default `guidance_scale`.
    """
    if task not in spec.tasks:
        raise ValueError(f"{spec.id!r} does not do {task!r}; it does {list(spec.tasks)}")
    extra: dict = {}
    if task == "i2v":
        if image is None:
            raise ValueError("image-to-video needs an image")
        size = getattr(image, "size", None)
        if width is not None and height is not None and size != (width, height):
            raise ValueError(f"the image is {size}, the video {(width, height)}: resize it first")
        extra["image"] = image
    elif image is not None:
        raise ValueError(f"{task!r} takes no image")
    if spec.boundary_ratio is not None:
        extra["guidance_scale_2"] = guidance_scale if guidance_scale_2 is None else guidance_scale_2
    elif guidance_scale_2 is not None:
        raise ValueError(f"{spec.id!r} has one transformer: guidance_scale_2 does not apply")
    return extra


def prepare_image(image, width: int, height: int):
    """`image` (PIL) as an RGB image of exactly `width x height`: scaled to cover the frame,
    keeping its aspect, then centre-cropped (what a first frame needs)."""
    from PIL import Image

    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
