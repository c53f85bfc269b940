"""Tiny random-weight Wan pipelines, built in code with no downloads.

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

`build_tiny_components` makes the parts of every family's twin (`worker.families` assembles
them into pipelines per `contract.models` spec):
- Wan 2.1 I2V: a tiny `CLIPVisionModel` (32x32 images, patch 8: 17 tokens) and its
  `CLIPImageProcessor`; the transformer takes the image condition (`in_channels` = latent +
  4 mask + latent channels) and the CLIP tokens (`image_dim`, `added_kv_proj_dim`);
- Wan 2.2 TI2V 5B: a Wan 2.2-style VAE (`is_residual`, 2x2 pixel patchify to 12 channels,
  three downsamples: 16x spatial, 4x temporal; 12 latent channels), so `4k+1` frames at
  `H x W` (multiples of 32) give the 5B's grid `(k+1, H/32, W/32)`;
- Wan 2.2 A14B: two transformers of the same shape (high-noise `transformer`, low-noise
  `transformer_2`), the I2V one with the image condition but no image encoder.

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
LATENT_CHANNELS_22 = 12  # the Wan 2.2 VAE's latent (the real one has 48)
IMAGE_DIM = 32  # CLIP vision hidden size, the transformer's image_dim
MASK_CHANNELS = 4  # I2V: the first-frame mask, one channel per frame of a latent frame

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
TRANSFORMER_CONFIG = dict(
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
VAE_CONFIG = dict(
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


# `AutoencoderKLWan` arguments of the Wan 2.2 TI2V 5B twin: the real one's structure (residual
# blocks, 2x2 pixel patchify, decoder wider than encoder) at toy width.
VAE22_CONFIG: dict[str, Any] = dict(
    base_dim=VAE_BASE_DIM,
    decoder_base_dim=2 * VAE_BASE_DIM,
    z_dim=LATENT_CHANNELS_22,
    dim_mult=[1, 2, 4, 4],  # three downsamples after the 2x2 patchify: 16x spatial
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,  # 3 colours x 2 x 2 pixels
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=[0.0] * LATENT_CHANNELS_22,
    latents_std=[1.0] * LATENT_CHANNELS_22,
)

# `CLIPVisionConfig` arguments of the Wan 2.1 I2V twin's image encoder (the real one is a
# ViT-H/14 at 224 pixels: 257 tokens of 1280).
IMAGE_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=IMAGE_DIM,
    intermediate_size=2 * IMAGE_DIM,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=IMAGE_DIM,
    hidden_act="gelu",
)
IMAGE_SIZE: int = IMAGE_ENCODER_CONFIG["image_size"]

VAES: dict[str, dict[str, Any]] = {"wan2.1": VAE_CONFIG, "wan2.2": VAE22_CONFIG}


def transformer_config(
    *, latent_channels: int = LATENT_CHANNELS, image_conditioned: bool = False, image_dim=None
) -> dict:
    """`WanTransformer3DModel` arguments of a twin: `image_conditioned` (I2V by concatenation,
    Wan 2.1 I2V and Wan 2.2 I2V A14B) adds the mask and the image latent to the input channels;
    `image_dim` adds the CLIP image tokens to the cross-attention (Wan 2.1 I2V)."""
    in_channels = latent_channels
    if image_conditioned:
        in_channels = 2 * latent_channels + MASK_CHANNELS
    config = dict(TRANSFORMER_CONFIG, in_channels=in_channels, out_channels=latent_channels)
    if image_dim is not None:
        config.update(image_dim=image_dim, added_kv_proj_dim=HEADS * HEAD_DIM)
    return config


def _transformer(config=None):
    from diffusers.models import WanTransformer3DModel

    return WanTransformer3DModel(**(config or TRANSFORMER_CONFIG)).eval()


def _vae(config=None):
    from diffusers.models import AutoencoderKLWan

    return AutoencoderKLWan(**(config or VAE_CONFIG)).eval()


def _image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()


def build_image_processor(image_size: int = IMAGE_SIZE):
    """CLIP's image processor at `image_size`: resize the short side, centre crop, normalise
    with CLIP's mean and std (the real Wan 2.1 I2V one is this at 224)."""
    import transformers

    # transformers 5: the PIL backend, which needs no torchvision; in 4 CLIPImageProcessor is it.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        processor_class = transformers.CLIPImageProcessor
    return processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def _scheduler(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    # The Wan diffusers repos ship UniPC with flow sigmas; shift 3.0 is Wan 2.1's 480p value.
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
    )


def build_tiny_components(
    *,
    seed: int = 0,
    vae: str = "wan2.1",
    image_conditioned: bool = False,
    image_encoder: bool = False,
    experts: int = 1,
    flow_shift: float = 3.0,
) -> dict:
    """The parts of a tiny twin (fp32, CPU), deterministic for `seed`, as the keyword arguments
    of `WanPipeline` / `WanImageToVideoPipeline` (absent parts are `None`).

    - `vae`: `"wan2.1"` (8x spatial, 8 latent channels) or `"wan2.2"` (the TI2V 5B's: residual,
      16x spatial, 12 latent channels);
    - `image_conditioned`: the transformer takes the I2V condition concatenated to its input;
    - `image_encoder`: a CLIP vision encoder and image processor (Wan 2.1 I2V), whose tokens the
      transformer's cross-attention reads;
    - `experts`: 2 for Wan 2.2 A14B's high-noise `transformer` and low-noise `transformer_2`.

    The defaults give the Wan 2.1 T2V twin, with the same weights as `build_tiny_pipeline`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if vae not in VAES:
        raise ValueError(f"vae must be one of {sorted(VAES)}, got {vae!r}")
    if experts not in (1, 2):
        raise ValueError(f"experts must be 1 or 2, got {experts!r}")
    vae_config = VAES[vae]
    config = transformer_config(
        latent_channels=vae_config["z_dim"],
        image_conditioned=image_conditioned,
        image_dim=IMAGE_DIM if image_encoder else None,
    )
    # fork_rng keeps the caller's global RNG state: building a model must not shift the noise
    # of a later generation. The order of the first three keeps the Wan 2.1 T2V twin's weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = dict(
            text_encoder=_text_encoder(),
            transformer=_transformer(config),
            vae=_vae(vae_config),
            transformer_2=_transformer(config) if experts == 2 else None,
            image_encoder=_image_encoder() if image_encoder else None,
        )
    parts.update(
        tokenizer=build_tokenizer(),
        scheduler=_scheduler(flow_shift),
        image_processor=build_image_processor() if image_encoder else None,
    )
    return parts


def build_tiny_pipeline(seed: int = 0):
    """The tiny random-weight `diffusers.WanPipeline` (fp32, CPU), deterministic for `seed`.

    It saves with `save_pretrained(dir)` and loads back with `WanPipeline.from_pretrained(dir)`.
    """
    from diffusers import WanPipeline

    parts = build_tiny_components(seed=seed)
    return WanPipeline(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        transformer=parts["transformer"],
        vae=parts["vae"],
        scheduler=parts["scheduler"],
    )
