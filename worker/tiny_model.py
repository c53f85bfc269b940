"""A tiny random-weight Wan text-to-video pipeline, built in code with no downloads.

`MODEL=tiny` is the embedded default: it lets the whole service (and every test) run on any
machine. It is a real `diffusers.WanPipeline` with real component classes, only very small and
with random weights, so its videos are noise-like: it exercises every code path, not quality.

What matches the real Wan 2.1 and what does not:
- same classes: byte-level tokenizer (built with `tokenizers`, wrapped as a transformers fast
  tokenizer), `UMT5EncoderModel`, `WanTransformer3DModel`, `AutoencoderKLWan`,
  `UniPCMultistepScheduler` with flow sigmas (the scheduler the Wan 2.1 diffusers repos ship);
- same compression: VAE 4x temporal and 8x spatial, transformer patch `(1, 2, 2)`, so a request
  of `4k+1` frames at `H x W` (multiples of 16) gives the real model's latent grid
  `(k+1, H/16, W/16)`;
- three transformer blocks, so VMoBA's 1D, 2D and 3D layer kinds all run;
- everything else is tiny: width 32 (2 heads of 16), 2 text-encoder layers, an 8-channel VAE.

Weights come from a private RNG seeded with `seed` (the global RNG is left untouched), so the
same seed always gives the same pipeline.
"""

from __future__ import annotations

from typing import Any

import torch

# Sizes of the tiny model, in one place so tests and `describe()` can refer to them.
TEXT_DIM = 32  # UMT5 d_model, which is also the transformer's text_dim
TEXT_LAYERS = 2
TEXT_HEADS = 4
HEADS = 2
HEAD_DIM = 16  # rope splits it into t/h/w parts of 8/4/4
LAYERS = 3  # one of each VMoBA layer kind: 1d, 2d, 3d
FFN_DIM = 64
LATENT_CHANNELS = 8
VAE_BASE_DIM = 8

# Tokenizer: the 256 bytes after the T5 special tokens (pad 0, eos 1, unk 2).
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def build_tokenizer():
    """A byte-level tokenizer with T5's special-token ids, as a transformers fast tokenizer.

    Every string tokenises (each UTF-8 byte is a token) and `</s>` is appended, as T5 does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(SPECIAL_TOKENS) + 256,
        d_model=TEXT_DIM,
        d_kv=TEXT_DIM // TEXT_HEADS,
        d_ff=2 * TEXT_DIM,
        num_layers=TEXT_LAYERS,
        num_heads=TEXT_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


# `WanTransformer3DModel` arguments (also used by `bench.pipeline --tiny`).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=FFN_DIM,
    num_layers=LAYERS,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# `AutoencoderKLWan` arguments.
VAE_CONFIG: dict[str, Any] = dict(
    base_dim=VAE_BASE_DIM,
    z_dim=LATENT_CHANNELS,
    dim_mult=[1, 2, 4, 4],  # three downsamples: 8x spatial
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # two temporal downsamples: 4x
    dropout=0.0,
    latents_mean=[0.0] * LATENT_CHANNELS,
    latents_std=[1.0] * LATENT_CHANNELS,
)


def _transformer():
    from diffusers.models import (
        WanTransformer3DModel,
    )  # typed, unlike `diffusers.WanTransformer3DModel`

    return WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()


def _vae():
    from diffusers.models import AutoencoderKLWan  # typed, unlike `diffusers.AutoencoderKLWan`

    return AutoencoderKLWan(**VAE_CONFIG).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    # The Wan 2.1 diffusers repos ship UniPC with flow sigmas; shift 3.0 is their 480p value.
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def build_tiny_pipeline(seed: int = 0):
    """The tiny random-weight `diffusers.WanPipeline` (fp32, CPU), deterministic for `seed`.

    It saves with `save_pretrained(dir)` and loads back with `WanPipeline.from_pretrained(dir)`.
    """
    from diffusers import WanPipeline

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    # fork_rng keeps the caller's global RNG state: building a model must not shift the noise
    # of a later generation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder()
        transformer = _transformer()
        vae = _vae()
    return WanPipeline(
        tokenizer=build_tokenizer(),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=_scheduler(),
    )
