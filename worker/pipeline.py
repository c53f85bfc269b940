"""Loading the text-to-video pipeline a worker serves, and describing it for job sidecars.

`MODEL` is `tiny` (the random-weight pipeline built in code, `worker.tiny_model`), a hub id
(e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) or a local diffusers directory. Real models load in
bf16 on CUDA (the VAE in fp32, as the Wan model cards recommend: it decodes visibly better and
costs little) and fp32 on the CPU.
"""

from __future__ import annotations

import os
import warnings

import torch

TINY = "tiny"
TINY_NOTE = "tiny random-weight Wan pipeline built in code: exercises the service, output is noise"

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# Where load_pipeline records what it loaded (read by describe()).
_MODEL_ATTR = "_vmoba_serve_model"


def is_tiny(model: str) -> bool:
    """Whether `model` names the built-in tiny random model."""
    return isinstance(model, str) and model.strip().lower() == TINY


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """`None`/`"auto"` -> bf16 on CUDA, fp32 elsewhere; names (`"bf16"`) or torch dtypes pass."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(
        f"dtype must be 'auto', one of {sorted(DTYPES)} or a torch dtype, got {dtype!r}"
    )


def check_device(device) -> torch.device:
    """`device` as a torch device; `ValueError` for a bad name or CUDA where there is none."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return torch_device


def load_pipeline(model: str, *, device: str = "cpu", dtype=None, seed: int = 0):
    """The `diffusers.WanPipeline` named by `model`, on `device`.

    - `"tiny"`: `worker.tiny_model.build_tiny_pipeline(seed)`; always fp32 (`dtype` must be
      `None`, `"auto"` or fp32: the tiny model exists to be exact and cheap, not fast).
    - anything else: `WanPipeline.from_pretrained(model)` (hub id or local directory) with the
      transformer and text encoder in `dtype` (default bf16 on CUDA, fp32 on CPU) and the VAE
      in fp32. Nothing is downloaded unless `model` is a hub id that is not in the cache.

    `worker.families.build_pipelines` builds every registry model (image-to-video, Wan 2.2).
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be 'tiny', a hub id or a directory, got {model!r}")
    torch_device = check_device(device)

    if is_tiny(model):
        if resolve_dtype(dtype, "cpu") != torch.float32:
            raise ValueError(f"the tiny model runs in fp32 only, got dtype={dtype!r}")
        from .tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed)
        name = TINY
    else:
        name = model_path(model)
        pipe = load_hub_pipeline(name, "WanPipeline", dtype=resolve_dtype(dtype, device))
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    setattr(pipe, _MODEL_ATTR, name)
    return pipe


def load_hub_pipeline(model: str, pipeline: str, *, dtype: torch.dtype, image_encoder=False):
    """`diffusers.<pipeline>.from_pretrained(model)` (a hub id or a local directory) with the
    transformer(s) and text encoder in `dtype`, the VAE in fp32 (the Wan model cards' advice: it
    decodes visibly better and costs little) and, with `image_encoder`, the CLIP image encoder in
    fp32 (as the Wan 2.1 I2V model cards load it). On the CPU; the caller moves it.
    """
    import diffusers

    model = model_path(model)
    extra = {}
    with warnings.catch_warnings():
        # diffusers 0.42 renames `torch_dtype` to `dtype`; older ones (GPU images) know only
        # `torch_dtype`, which still works here.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        extra["vae"] = diffusers.AutoencoderKLWan.from_pretrained(
            model, subfolder="vae", torch_dtype=torch.float32
        )
        if image_encoder:
            from transformers import CLIPVisionModel

            extra["image_encoder"] = CLIPVisionModel.from_pretrained(
                model, subfolder="image_encoder", torch_dtype=torch.float32
            )
        pipe = getattr(diffusers, pipeline).from_pretrained(model, torch_dtype=dtype, **extra)
    return pipe


def model_path(model: str) -> str:
    """A hub id as it is, a local directory with `~` expanded (`ValueError` if it is missing)."""
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(f"model directory {model!r} does not exist")
    return os.path.expanduser(model) if looks_local else model


def describe(pipe) -> dict:
    """What a job sidecar records about the model: name, sizes, dtypes, device.

    JSON-ready; `tiny` is true (with a note saying so) for the built-in random model. A pipeline
    of `worker.families.build_pipelines` also gives its registry family and weights kind, and
    the settings that differ per family (`boundary_ratio`, `expand_timesteps`).
    """
    name = getattr(pipe, _MODEL_ATTR, None) or getattr(pipe, "name_or_path", None) or "unknown"
    out = {"model": name, "tiny": name == TINY, "pipeline": type(pipe).__name__}
    if out["tiny"]:
        out["note"] = TINY_NOTE
    spec = getattr(pipe, "_vmoba_serve_spec", None)  # worker.families.SPEC_ATTR
    if spec is not None:
        out.update(family=spec.family, weights=spec.weights, tiny=spec.weights == "tiny")
        if spec.is_builtin and spec.note:
            out["note"] = spec.note
        config = getattr(pipe, "config", {})
        out["boundary_ratio"] = config.get("boundary_ratio")
        out["expand_timesteps"] = bool(config.get("expand_timesteps", False))
    params = {}
    for part in ("transformer", "transformer_2", "text_encoder", "image_encoder", "vae"):
        module = getattr(pipe, part, None)
        if module is not None:
            params[part] = sum(p.numel() for p in module.parameters())
    out["params"] = params
    out["param_count"] = sum(params.values())
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        cfg = transformer.config
        first = next(transformer.parameters())
        # the dtype most weights are in (a few modules stay fp32, as diffusers keeps them)
        by_dtype: dict[torch.dtype, int] = {}
        for p in transformer.parameters():
            by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
        main_dtype = max(by_dtype, key=by_dtype.__getitem__)
        out["transformer"] = {
            "class": type(transformer).__name__,
            "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "attention_head_dim": cfg.attention_head_dim,
            "dim": cfg.num_attention_heads * cfg.attention_head_dim,
            "ffn_dim": cfg.ffn_dim,
            "patch_size": list(cfg.patch_size),
            "in_channels": cfg.in_channels,
            "text_dim": cfg.text_dim,
            "dtype": str(main_dtype).replace("torch.", ""),
            "device": str(first.device),
        }
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        out["vae"] = {
            "class": type(vae).__name__,
            "scale_factor_temporal": getattr(pipe, "vae_scale_factor_temporal", None),
            "scale_factor_spatial": getattr(pipe, "vae_scale_factor_spatial", None),
            "dtype": str(vae.dtype).replace("torch.", ""),
        }
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        out["scheduler"] = type(scheduler).__name__
    return out
