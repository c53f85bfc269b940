"""Full-size Wan architectures with random weights, built on the device with no downloads.

`MODEL=wan2.1-1.3b-random` gives a `WanPipeline` with the real Wan 2.1 T2V 1.3B shapes, so a
worker can run the real path (Triton kernels, 480p, the real VAE and text encoder cost) on a GPU
machine that cannot download the weights:

- transformer: `WanTransformer3DModel` with the config of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
  (dim 1536, 30 layers, 12 heads of 128, ffn 8960, patch 1x2x2, text_dim 4096), bf16 except the
  modules diffusers keeps in fp32;
- text encoder: a UMT5-XXL-shaped encoder (24 layers, d_model 4096, 64 heads, d_ff 10240,
  vocabulary 256384), bf16; the tokenizer is the tiny model's byte-level one (its ids fit in the
  vocabulary; only the text, not the cost, differs);
- VAE: `AutoencoderKLWan` with its default (Wan 2.1) config, fp32 as the model cards recommend;
- scheduler: UniPC with flow sigmas, shift 3.0 (the 480p value).

Linear and embedding weights are drawn from N(0, 0.02), the scale of trained weights, so 50
steps of a random model stay finite; the output is noise. The video, not the timing, is fake.
"""

from __future__ import annotations

from typing import Any

import torch

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
WAN21_T2V_1_3B: dict[str, Any] = dict(
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
# text_encoder/config.json of the same repository (google/umt5-xxl's encoder)
UMT5_XXL: dict[str, Any] = dict(
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
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b-random": dict(
        transformer=WAN21_T2V_1_3B, text_encoder=UMT5_XXL, vae={}, flow_shift=3.0
    ),
}
INIT_STD = 0.02


def build_random_pipeline(
    name: str, *, device: str = "cuda", dtype=None, seed: int = 0, architectures: dict | None = None
):
    """The random-weight `WanPipeline` called `name` (see `ARCHITECTURES`) on `device`.

    `dtype` (default bf16 on CUDA, fp32 on CPU) applies to the transformer and text encoder;
    the VAE stays fp32. `architectures` replaces the table (tests build scaled-down ones).
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    # The same classes; mypy reads diffusers' top-level names as its no-torch placeholders.
    from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .pipeline import resolve_dtype
    from .tiny_model import build_tokenizer

    table = architectures or ARCHITECTURES
    if name not in table:
        raise ValueError(f"unknown random architecture {name!r}; known: {sorted(table)}")
    arch = table[name]
    torch_dtype = resolve_dtype(dtype, device)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**arch["transformer"])
        # A Module to mypy: transformers wraps `to` in functools.wraps, which it cannot call as
        # a method.
        text_encoder: torch.nn.Module = UMT5EncoderModel(UMT5Config(**arch["text_encoder"]))
        vae = AutoencoderKLWan(**arch["vae"])
        generator = torch.Generator(device=device).manual_seed(seed)
        for module in (transformer, text_encoder):
            _trained_scale_init(module, generator)
    _cast_keeping_fp32(transformer, torch_dtype)
    text_encoder.to(torch_dtype)
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=arch["flow_shift"],
    )
    pipe: Any = WanPipeline(  # to mypy a no-torch placeholder (see the imports above)
        tokenizer=build_tokenizer(),
        text_encoder=text_encoder.eval(),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
    )
    for part in (transformer, text_encoder, vae):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _trained_scale_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Embedding)):
            sub.weight.normal_(0.0, INIT_STD, generator=generator)
            bias = getattr(sub, "bias", None)  # Embedding has none; a Linear's may be None
            if bias is not None:
                bias.zero_()


def _cast_keeping_fp32(model, dtype) -> None:
    """`dtype`, except the modules diffusers keeps in fp32 when it loads a checkpoint."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)
