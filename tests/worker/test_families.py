"""Every registry family's pipelines (`worker.families`): the tiny twins run each task and give
the spec's latent grid, A14B switches experts at its boundary, VMoBA runs on all of them, the
hub path loads a saved twin, and the full-size random builders work scaled down (CPU, seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from contract.models import REGISTRY, TINY_MODELS, custom_model, get_model
from vmoba.diffusers import AttentionSettings, VMoBAAttnProcessor, install_vmoba
from worker import random_model
from worker.families import (
    FAMILIES,
    TEXT_LENGTH,
    assemble,
    build_pipelines,
    call_kwargs,
    prepare_image,
    prompt_kwargs,
)
from worker.pipeline import describe
from worker.tiny_model import build_tiny_components

SEED = 0  # weights of the twins
GEN_SEED = 3  # starting noise and the input image
FRAMES, STEPS, GUIDANCE = 5, 2, 5.0
# (height, width) per family: not square, so a swapped axis shows; multiples of 32 for the
# Wan 2.2 VAE's 16x compression times the 2x2 patch.
SIZES = {"wan2.2-ti2v": (64, 96)}
SMALL = (32, 64)
TINY_CASES = [(spec.id, task) for spec in TINY_MODELS for task in spec.tasks]
# See test_pipeline.py: reloaded weights may round differently in CPU matmuls.
RELOAD_ATOL = 1e-5

_BUILT: dict = {}


def tiny_pipes(model_id: str) -> dict:
    """The twin's pipelines, built once per test session."""
    if model_id not in _BUILT:
        _BUILT[model_id] = build_pipelines(get_model(model_id), seed=SEED)
    return _BUILT[model_id]


def size_of(spec) -> tuple[int, int]:
    return SIZES.get(spec.family, SMALL)


def random_image(height: int, width: int, seed: int = GEN_SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def generate(spec, pipe, task, *, steps=STEPS, height=None, width=None, seed=GEN_SEED, **kw):
    """One call the way the runtime makes it: prompt embeddings first, then the pipeline."""
    if height is None:
        height, width = size_of(spec)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            do_classifier_free_guidance=True,
            device=torch.device("cpu"),
            **prompt_kwargs(spec),
        )
    image = random_image(height, width, seed) if task == "i2v" else None
    return pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        num_frames=FRAMES,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **call_kwargs(spec, task, guidance_scale=GUIDANCE, image=image, width=width, height=height),
        **kw,
    ).frames


def transformers_of(pipe) -> dict:
    return {
        name: module
        for name in ("transformer", "transformer_2")
        if (module := getattr(pipe, name, None)) is not None
    }


class Recorder:
    """Forward pre-hooks on the pipeline's transformers: which one ran, on which latent grid,
    at which timestep."""

    def __init__(self, pipe):
        self.calls = []  # (name, grid, timestep)
        self._hooks = []
        for name, module in transformers_of(pipe).items():

            def hook(module, args, kwargs, name=name):
                _, _, f, h, w = kwargs["hidden_states"].shape
                pt, ph, pw = module.config.patch_size
                t = float(pipe.current_timestep)
                self.calls.append((name, (f // pt, h // ph, w // pw), t))

            self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


# -- tiny twins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id, task", TINY_CASES)
def test_tiny_twin_generates_on_the_spec_grid(model_id, task):
    print(f"seed={SEED} gen_seed={GEN_SEED}")
    spec = get_model(model_id)
    pipe = tiny_pipes(model_id)[task]
    height, width = size_of(spec)
    with Recorder(pipe) as rec:
        video = generate(spec, pipe, task)
    assert video.shape == (1, FRAMES, height, width, 3)
    assert np.isfinite(video).all() and video.std() > 0
    assert {grid for _, grid, _ in rec.calls} == {spec.grid(FRAMES, height, width)}
    assert len(rec.calls) == STEPS * 2  # classifier-free guidance: two calls a step


@pytest.mark.parametrize("model_id", [s.id for s in TINY_MODELS])
def test_tiny_twins_are_deterministic_and_keep_the_global_rng(model_id):
    print(f"seed={SEED}")
    spec = get_model(model_id)
    rng = torch.random.get_rng_state()
    a, b = build_pipelines(spec, seed=SEED), build_pipelines(spec, seed=SEED + 1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    built = tiny_pipes(model_id)
    task = spec.tasks[0]
    for name, module in transformers_of(built[task]).items():
        same = zip(module.state_dict().values(), getattr(a[task], name).state_dict().values())
        assert all(torch.equal(x, y) for x, y in same)
        other = zip(module.state_dict().values(), getattr(b[task], name).state_dict().values())
        assert not all(torch.equal(x, y) for x, y in other)
    for name, module in transformers_of(built[task]).items():
        assert module.dtype == torch.float32 and len(module.blocks) == 3, name


def test_pipelines_of_one_model_share_their_components():
    spec = get_model("tiny-wan2.2-ti2v")
    pipes = tiny_pipes(spec.id)
    t2v, i2v = pipes["t2v"], pipes["i2v"]
    assert type(t2v).__name__ == "WanPipeline" and type(i2v).__name__ == "WanImageToVideoPipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(t2v, part) is getattr(i2v, part), part
    assert t2v.config.expand_timesteps and i2v.config.expand_timesteps
    assert i2v.image_encoder is None and t2v.transformer_2 is None
    assert t2v.vae_scale_factor_spatial == 16 and t2v.transformer.config.in_channels == 12

    wan21 = tiny_pipes("tiny-wan2.1-i2v")["i2v"]
    assert wan21.image_encoder is not None and wan21.image_processor is not None
    assert wan21.transformer.config.image_dim == wan21.image_encoder.config.hidden_size
    assert wan21.transformer.config.in_channels == 2 * 8 + 4  # noise + mask + image latent
    for model_id in ("tiny-wan2.2-t2v-a14b", "tiny-wan2.2-i2v-a14b"):
        spec = get_model(model_id)
        (pipe,) = tiny_pipes(model_id).values()
        assert pipe.transformer_2 is not None and pipe.transformer_2 is not pipe.transformer
        assert pipe.config.boundary_ratio == spec.boundary_ratio
        assert getattr(pipe, "image_encoder", None) is None

    info = describe(i2v)
    assert info["model"] == "tiny-wan2.2-ti2v"
    assert info["tiny"] is True and info["family"] == "wan2.2-ti2v" and info["expand_timesteps"]


def test_encode_prompt_is_the_same_on_every_pipeline():
    """One text encoder, one encoding: the i2v pipeline encodes as the t2v one does (diffusers'
    i2v prompt cleaning would need ftfy), with the 512-token context every family uses."""
    spec = get_model("tiny-wan2.2-ti2v")
    pipes = tiny_pipes(spec.id)
    with torch.no_grad():
        out = {
            task: pipe.encode_prompt("Zoë's café at dusk", "blurry", True, **prompt_kwargs(spec))
            for task, pipe in pipes.items()
        }
    for a, b in zip(out["t2v"], out["i2v"]):
        assert a.shape[1] == TEXT_LENGTH and torch.equal(a, b)


def test_wan21_i2v_cross_attention_reads_the_clip_tokens():
    """Wan 2.1 I2V puts the CLIP tokens before the text and takes the text as the last 512
    tokens: with `prompt_kwargs` the image branch of the cross-attention sees the image."""
    spec = get_model("tiny-wan2.1-i2v")
    pipe = tiny_pipes(spec.id)["i2v"]
    seen = []
    attn2 = pipe.transformer.blocks[0].attn2
    hook = attn2.add_k_proj.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    try:
        generate(spec, pipe, "i2v", steps=1)
    finally:
        hook.remove()
    cfg = pipe.image_encoder.config
    assert seen and set(seen) == {(cfg.image_size // cfg.patch_size) ** 2 + 1}


@pytest.mark.parametrize("model_id", ["tiny-wan2.2-t2v-a14b", "tiny-wan2.2-i2v-a14b"])
def test_a14b_switches_experts_at_the_boundary(model_id):
    print(f"seed={SEED} gen_seed={GEN_SEED}")
    spec = get_model(model_id)
    (task,) = spec.tasks
    pipe = tiny_pipes(model_id)[task]
    steps = 6
    with Recorder(pipe) as rec:
        generate(spec, pipe, task, steps=steps)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    boundary = spec.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    switch = sum(t >= boundary for t in timesteps)
    assert 0 < switch < steps  # the test sees both experts
    expected = ["transformer"] * (2 * switch) + ["transformer_2"] * (2 * (steps - switch))
    assert [name for name, _, _ in rec.calls] == expected
    assert [t for _, _, t in rec.calls] == [t for t in timesteps for _ in range(2)]


@pytest.mark.parametrize("model_id", [s.id for s in TINY_MODELS])
def test_vmoba_runs_on_every_transformer_of_every_family(model_id):
    """`install_vmoba` on one pipeline covers the other pipelines of the model (shared
    transformers and scheduler: the dense steps are counted right in each) and both A14B
    experts (every call of each sparse, with no dense steps)."""
    print(f"seed={SEED} gen_seed={GEN_SEED}")
    spec = get_model(model_id)
    pipes = tiny_pipes(model_id)
    first = pipes[spec.tasks[0]]
    experts = transformers_of(first)
    handle = install_vmoba(first, AttentionSettings(kernel="reference", dense_steps=0.0))
    # A14B: 4 steps, so that both experts run; all sparse, so that both run VMoBA proper.
    steps, dense = (4, 0) if spec.boundary_ratio is not None else (STEPS, STEPS // 2)
    settings = AttentionSettings(kernel="reference", threshold=0.5, dense_steps=dense / steps)
    counts = dict.fromkeys(experts, 0)
    hooks = []
    for name, module in experts.items():
        for block in module.blocks:
            assert isinstance(block.attn1.processor, VMoBAAttnProcessor), name

            def count(*_, name=name):
                counts[name] += 1

            hooks.append(block.attn1.register_forward_pre_hook(count))
    try:
        for task, pipe in pipes.items():
            before = sum(counts.values())
            with handle.use(settings) as stats:
                generate(spec, pipe, task, steps=steps)
            calls = steps * 2 * 3  # steps x (cond, uncond) x 3 blocks
            dense_calls = dense * 2 * 3
            assert sum(counts.values()) - before == calls, task
            assert stats["steps"] == steps and stats["dense_steps"] == dense, task
            assert stats["layer_calls"] == {"dense": dense_calls, "sparse": calls - dense_calls}
            assert set(stats["density_by_kind"]) == {"1d", "2d", "3d"}
            assert 0 < stats["density"] <= 1
        if spec.boundary_ratio is not None:
            assert counts["transformer"] > 0 and counts["transformer_2"] > 0, counts
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    for module in experts.values():
        assert not any(isinstance(b.attn1.processor, VMoBAAttnProcessor) for b in module.blocks)


# -- call kwargs, images, checks ------------------------------------------------------------------


def test_call_kwargs_per_family():
    image = random_image(32, 64)
    assert call_kwargs(get_model("tiny-wan2.1-t2v"), "t2v", guidance_scale=5.0) == {}
    assert call_kwargs(get_model("tiny-wan2.2-t2v-a14b"), "t2v", guidance_scale=4.0) == {
        "guidance_scale_2": 4.0
    }
    a14b_i2v = get_model("tiny-wan2.2-i2v-a14b")
    extra = call_kwargs(a14b_i2v, "i2v", guidance_scale=3.5, image=image, width=64, height=32)
    assert extra == {"image": image, "guidance_scale_2": 3.5}
    ti2v = get_model("tiny-wan2.2-ti2v")
    assert call_kwargs(ti2v, "i2v", guidance_scale=5.0, image=image) == {"image": image}
    assert prompt_kwargs(ti2v) == {"max_sequence_length": 512}
    bad = [
        (get_model("tiny-wan2.1-t2v"), "i2v", {}, "does not do"),
        (ti2v, "i2v", {}, "needs an image"),
        (ti2v, "t2v", {"image": image}, "takes no image"),
        (ti2v, "i2v", {"image": image, "width": 32, "height": 32}, "resize"),
        (ti2v, "t2v", {"guidance_scale_2": 3.0}, "one transformer"),
    ]
    for spec, task, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            call_kwargs(spec, task, guidance_scale=5.0, **kw)


def test_prepare_image_covers_and_centre_crops():
    source = Image.new("L", (300, 100), 128)
    image = prepare_image(source, 64, 32)
    assert image.size == (64, 32) and image.mode == "RGB"
    assert prepare_image(random_image(40, 40), 96, 64).size == (96, 64)


def test_a_model_that_does_not_match_its_spec_is_refused():
    parts = build_tiny_components(seed=SEED)  # a Wan 2.1 T2V twin: 8x VAE, one transformer
    with pytest.raises(ValueError, match="VAE compression"):
        assemble(get_model("tiny-wan2.2-ti2v"), parts)
    with pytest.raises(ValueError, match="two transformers"):
        assemble(get_model("tiny-wan2.2-t2v-a14b"), parts)
    with pytest.raises(ValueError, match="channels"):
        assemble(get_model("tiny-wan2.2-i2v-a14b"), dict(parts, transformer_2=parts["transformer"]))
    with pytest.raises(ValueError, match="image encoder"):
        assemble(get_model("tiny-wan2.1-i2v"), parts)
    with pytest.raises(ValueError, match="fp32"):
        build_pipelines(get_model("tiny-wan2.1-t2v"), dtype="bf16")


def test_every_registry_model_has_a_builder():
    for spec in REGISTRY.values():
        assert spec.family in FAMILIES, spec.id
        if spec.weights == "random":
            assert spec.id in random_model.ARCHITECTURES, spec.id


@pytest.mark.parametrize(
    "model_id", ["tiny-wan2.1-i2v", "tiny-wan2.2-t2v-a14b", "tiny-wan2.2-ti2v"]
)
def test_hub_path_loads_a_saved_twin(model_id, tmp_path):
    """`weights == "hub"` is `from_pretrained` (here of a local directory): the image encoder,
    the second expert and the Wan 2.2 VAE come back, and so does the video."""
    print(f"seed={SEED} gen_seed={GEN_SEED}")
    spec = get_model(model_id)
    task = spec.tasks[-1]  # TI2V 5B: its i2v pipeline, derived from the saved WanPipeline
    built = tiny_pipes(model_id)[task]
    tiny_pipes(model_id)[spec.tasks[0]].save_pretrained(tmp_path)
    hub_spec = custom_model(str(tmp_path), model_id)
    loaded = build_pipelines(hub_spec)
    assert set(loaded) == set(spec.tasks)
    pipe = loaded[task]
    assert type(pipe) is type(built) and pipe.vae.dtype == torch.float32
    if spec.family == "wan2.1-i2v":
        assert pipe.image_encoder.dtype == torch.float32
    # fresh memory for the loaded weights (see RELOAD_ATOL)
    for module in transformers_of(pipe).values():
        for p in module.parameters():
            p.data = p.data.clone()
    expected = generate(spec, built, task, steps=1)
    np.testing.assert_allclose(generate(hub_spec, pipe, task, steps=1), expected, atol=RELOAD_ATOL)
    assert describe(pipe)["model"] == str(tmp_path) and describe(pipe)["tiny"] is False


# -- full-size random architectures ---------------------------------------------------------------

RANDOM_IDS = [
    "wan2.1-t2v-14b-random",
    "wan2.1-i2v-14b-480p-random",
    "wan2.2-ti2v-5b-random",
    "wan2.2-t2v-a14b-random",
    "wan2.2-i2v-a14b-random",
]


def test_full_size_architectures_have_the_published_sizes():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    count = lambda m: sum(p.numel() for p in m.parameters())
    arch = random_model.ARCHITECTURES
    with torch.device("meta"):
        size = {k: count(WanTransformer3DModel(**arch[k]["transformer"])) for k in RANDOM_IDS}
        vae22 = AutoencoderKLWan(**arch["wan2.2-ti2v-5b-random"]["vae"])
        clip = CLIPVisionModel(
            CLIPVisionConfig(**arch["wan2.1-i2v-14b-480p-random"]["image_encoder"])
        )
    # the hub shows 14.3B, 16.4B (I2V: image cross-attention) and 5B
    assert size["wan2.1-t2v-14b-random"] == size["wan2.2-t2v-a14b-random"] == 14_288_491_584
    assert size["wan2.1-i2v-14b-480p-random"] == 16_394_878_784
    assert size["wan2.2-i2v-a14b-random"] == 14_288_901_184  # 20 more input channels
    assert size["wan2.2-ti2v-5b-random"] == 4_999_787_712
    assert count(vae22) == 704_688_668 and vae22.config.scale_factor_spatial == 16
    assert count(clip) == 630_766_080  # ViT-H/14 vision tower
    for model_id in ("wan2.2-t2v-a14b-random", "wan2.2-i2v-a14b-random"):
        assert arch[model_id]["transformer_2"] == arch[model_id]["transformer"]


def scaled_down(arch: dict) -> dict:
    """The architecture at toy width and depth, with its structure (channels, VAE kind, image
    encoder, experts) kept."""
    small_t = dict(num_layers=3, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
    small_t.update(text_dim=64, freq_dim=32)
    out = {}
    for key in ("transformer", "transformer_2"):
        if arch.get(key):
            t = dict(arch[key], **small_t)
            if t.get("image_dim"):
                t.update(image_dim=32, added_kv_proj_dim=32)
            out[key] = t
    out["text_encoder"] = dict(
        arch["text_encoder"], num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16
    )
    out["text_encoder"]["vocab_size"] = 512
    out["vae"] = dict(arch["vae"], base_dim=8)
    if "decoder_base_dim" in out["vae"]:
        out["vae"]["decoder_base_dim"] = 16
    if arch.get("image_encoder"):
        out["image_encoder"] = dict(
            arch["image_encoder"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
        )
    return out


@pytest.mark.parametrize("model_id", RANDOM_IDS)
def test_random_builder_runs_every_family_scaled_down(model_id):
    print(f"seed={SEED} gen_seed={GEN_SEED}")
    spec = get_model(model_id)
    arch = scaled_down(random_model.ARCHITECTURES[model_id])
    pipes = build_pipelines(spec, device="cpu", seed=SEED, architectures={model_id: arch})
    assert set(pipes) == set(spec.tasks)
    height, width = 32, 32
    for task, pipe in pipes.items():
        experts = transformers_of(pipe)
        assert len(experts) == (2 if spec.boundary_ratio else 1)
        weights = pipe.transformer.blocks[0].ffn.net[0].proj.weight
        assert abs(float(weights.std()) - random_model.INIT_STD) < 0.005  # trained-scale init
        with Recorder(pipe) as rec:
            video = generate(spec, pipe, task, steps=1, height=height, width=width)
        assert video.shape == (1, FRAMES, height, width, 3) and np.isfinite(video).all()
        assert {grid for _, grid, _ in rec.calls} == {spec.grid(FRAMES, height, width)}
    assert describe(pipe)["weights"] == "random"


def test_random_parts_are_created_in_their_dtypes():
    """bf16 transformers (diffusers' fp32 modules kept) and text encoder; fp32 VAE and image
    encoder; the process's default dtype restored after the build."""
    arch = scaled_down(random_model.ARCHITECTURES["wan2.1-i2v-14b-480p-random"])
    arch["transformer_2"] = arch["transformer"]
    parts = random_model.build_random_components(arch, device="cpu", dtype="bf16", seed=SEED)
    assert torch.get_default_dtype() == torch.float32
    for name in ("transformer", "transformer_2"):
        t = parts[name]
        assert t.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        assert t.scale_shift_table.dtype == t.blocks[0].norm2.weight.dtype == torch.float32
        assert t.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert {p.dtype for p in parts["text_encoder"].parameters()} == {torch.bfloat16}
    for name in ("vae", "image_encoder"):
        assert {p.dtype for p in parts[name].parameters()} == {torch.float32}, name
