"""Full-size Wan architectures with random weights, built on the device with no downloads.

`MODEL=wan2.1-1.3b-random` gives a `WanPipeline` with the real Wan 2.1 T2V 1.3B shapes, so a
worker can run the real path (Triton kernels, 480p, the real VAE and text encoder cost) on a GPU
machine that cannot download the weights. `ARCHITECTURES` has one entry per `<id>-random` model
of `contract.models` (every family); `worker.families.build_pipelines` builds their pipelines:

- transformer(s): `WanTransformer3DModel` with the config of the hub repository the entry names
  (two of them for Wan 2.2 A14B), in `dtype` (bf16 on CUDA) except the modules diffusers keeps in
  fp32 when it loads a checkpoint;
- text encoder: a UMT5-XXL-shaped encoder (24 layers, d_model 4096, 64 heads, d_ff 10240,
  vocabulary 256384), in `dtype`; the tokenizer is the tiny model's byte-level one (its ids fit in
  the vocabulary; only the text, not the cost, differs);
- VAE: `AutoencoderKLWan` with the Wan 2.1 config, or the Wan 2.2 one (48 latent channels, 16x
  spatial) for TI2V 5B, fp32 as the model cards recommend;
- image encoder (Wan 2.1 I2V only): a CLIP ViT-H/14 `CLIPVisionModel`, fp32 as the model cards
  load it, with CLIP's image processor at 224 pixels;
- scheduler: UniPC with flow sigmas.

Every module is created directly in its final dtype on the device (two 14B transformers built in
fp32 first would not fit an 80 GB GPU). Linear and embedding weights are drawn from N(0, 0.02),
the scale of trained weights, so 50 steps of a random model stay finite; the output is noise.
The video, not the timing, is fake.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
WAN21_T2V_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# transformer/config.json of Wan-AI/Wan2.1-T2V-14B-Diffusers; also transformer/ and
# transformer_2/ of Wan-AI/Wan2.2-T2V-A14B-Diffusers (the two experts have one shape)
WAN_T2V_14B = dict(WAN21_T2V_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (and -720P-): the image
# condition concatenated to the input (16 noise + 4 mask + 16 image latent channels) and the
# CLIP tokens (1280 wide) in the cross-attention
WAN21_I2V_14B = dict(WAN_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
# transformer/ and transformer_2/ of Wan-AI/Wan2.2-I2V-A14B-Diffusers: the concatenated image
# condition, no image encoder
WAN22_I2V_A14B = dict(WAN_T2V_14B, in_channels=36)
# transformer/config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers (24 heads x 128 = 3072)
WAN22_TI2V_5B = dict(
    WAN21_T2V_1_3B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336
)
# text_encoder/config.json of all of them (google/umt5-xxl's encoder)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)
# vae/config.json of the Wan 2.1 repositories and Wan 2.2 A14B: AutoencoderKLWan's defaults
WAN21_VAE: dict = {}
# vae/config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers (latents_mean/std: 0/1 here, the real
# statistics only matter for trained weights)
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
# image_encoder/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (open-clip ViT-H/14)
CLIP_VIT_H_14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)


def _arch(transformer, *, vae=WAN21_VAE, experts=1, image_encoder=None, flow_shift=None):
    arch = dict(transformer=transformer, text_encoder=UMT5_XXL, vae=vae)
    if experts == 2:
        arch["transformer_2"] = transformer
    if image_encoder is not None:
        arch["image_encoder"] = image_encoder
    if flow_shift is not None:
        arch["flow_shift"] = flow_shift
    return arch


# `<id>-random` of contract.models -> its parts. Optional keys: `transformer_2` (a second
# expert), `image_encoder` (a `CLIPVisionConfig`), `flow_shift` (the scheduler's shift; by
# default the spec's, see `worker.families`).
ARCHITECTURES = {
    "wan2.1-t2v-1.3b-random": _arch(WAN21_T2V_1_3B, flow_shift=3.0),
    "wan2.1-t2v-14b-random": _arch(WAN_T2V_14B),
    "wan2.1-i2v-14b-480p-random": _arch(WAN21_I2V_14B, image_encoder=CLIP_VIT_H_14),
    "wan2.1-i2v-14b-720p-random": _arch(WAN21_I2V_14B, image_encoder=CLIP_VIT_H_14),
    "wan2.2-ti2v-5b-random": _arch(WAN22_TI2V_5B, vae=WAN22_VAE),
    "wan2.2-t2v-a14b-random": _arch(WAN_T2V_14B, experts=2),
    "wan2.2-i2v-a14b-random": _arch(WAN22_I2V_A14B, experts=2),
}
# The name `MODEL=` took before the registry (its alias there).
ARCHITECTURES["wan2.1-1.3b-random"] = ARCHITECTURES["wan2.1-t2v-1.3b-random"]
INIT_STD = 0.02


def build_random_components(
    arch: dict, *, device: str = "cuda", dtype=None, seed: int = 0, flow_shift: float = 3.0
) -> dict:
    """The parts of architecture `arch` (an `ARCHITECTURES` value) on `device`, as the keyword
    arguments of `WanPipeline` / `WanImageToVideoPipeline` (absent parts are `None`).

    `dtype` (default bf16 on CUDA, fp32 on CPU) applies to the transformer(s) and the text
    encoder; the VAE and image encoder stay fp32. `flow_shift` is the scheduler's unless `arch`
    has one. Deterministic for `seed`; the caller's global RNG is left as it was.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .pipeline import resolve_dtype
    from .tiny_model import build_image_processor, build_tokenizer

    torch_dtype = resolve_dtype(dtype, device)
    parts: dict = dict(transformer_2=None, image_encoder=None, image_processor=None)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        with _default_dtype(torch_dtype):
            parts["transformer"] = WanTransformer3DModel(**arch["transformer"])
            parts["text_encoder"] = UMT5EncoderModel(UMT5Config(**arch["text_encoder"]))
        parts["vae"] = AutoencoderKLWan(**arch["vae"])
        if arch.get("transformer_2") is not None:
            with _default_dtype(torch_dtype):
                parts["transformer_2"] = WanTransformer3DModel(**arch["transformer_2"])
        if arch.get("image_encoder") is not None:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**arch["image_encoder"]))
            parts["image_processor"] = build_image_processor(arch["image_encoder"]["image_size"])
        generator = torch.Generator(device=device).manual_seed(seed)
        trained = ("transformer", "text_encoder", "transformer_2", "image_encoder")
        for module in (parts[k] for k in trained if parts[k] is not None):
            _trained_scale_init(module, generator)
    for key in ("transformer", "transformer_2"):
        if parts[key] is not None:
            _cast_keeping_fp32(parts[key], torch_dtype)
    parts["text_encoder"].to(torch_dtype)
    for key in ("transformer", "transformer_2", "text_encoder", "vae", "image_encoder"):
        if parts[key] is not None:
            parts[key] = parts[key].eval().requires_grad_(False)
    parts["tokenizer"] = build_tokenizer()
    parts["scheduler"] = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=arch.get("flow_shift", flow_shift),
    )
    return parts


def build_random_transformer(config: dict, *, device: str = "cuda", dtype=None, seed: int = 0):
    """A `WanTransformer3DModel` of `config` (e.g. `WAN21_T2V_1_3B`) with random weights at the
    scale of trained ones, in `dtype` (default bf16 on CUDA) except diffusers' fp32 modules, in
    eval mode with gradients off (a benchmark turns them on to train it)."""
    from diffusers import WanTransformer3DModel

    from .pipeline import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    with torch.random.fork_rng(devices=[]), torch.device(device), _default_dtype(torch_dtype):
        torch.manual_seed(seed)
        model: Any = WanTransformer3DModel(**config)
    _trained_scale_init(model, torch.Generator(device=device).manual_seed(seed))
    _cast_keeping_fp32(model, torch_dtype)
    return model.eval().requires_grad_(False)


def build_random_pipeline(
    name: str, *, device: str = "cuda", dtype=None, seed: int = 0, architectures: dict | None = None
):
    """The random-weight text-to-video `WanPipeline` called `name` (see `ARCHITECTURES`) on
    `device`: the entry point of `MODEL=wan2.1-1.3b-random`. Entries with an image condition or
    two experts need their spec: build them with `worker.families.build_pipelines`.

    `dtype` (default bf16 on CUDA, fp32 on CPU) applies to the transformer and text encoder;
    the VAE stays fp32. `architectures` replaces the table (tests build scaled-down ones).
    """
    from diffusers import WanPipeline

    table = architectures or ARCHITECTURES
    if name not in table:
        raise ValueError(f"unknown random architecture {name!r}; known: {sorted(table)}")
    arch = table[name]
    t = arch["transformer"]
    if (
        arch.get("transformer_2")
        or arch.get("image_encoder")
        or t["in_channels"] != t.get("out_channels", t["in_channels"])
    ):
        raise ValueError(
            f"{name!r} is not a one-transformer text-to-video model: "
            "use worker.families.build_pipelines(get_model(name))"
        )
    parts = build_random_components(arch, device=device, dtype=dtype, seed=seed)
    pipe: Any = WanPipeline(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        transformer=parts["transformer"],
        vae=parts["vae"],
        scheduler=parts["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create floating-point parameters in `dtype` (process-wide while it lasts: models are built
    at start-up, before any generation runs)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def _trained_scale_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Embedding)):
            sub.weight.normal_(0.0, INIT_STD, generator=generator)
            bias = getattr(sub, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()


def _cast_keeping_fp32(model, dtype) -> None:
    """`dtype`, except the modules diffusers keeps in fp32 when it loads a checkpoint."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
