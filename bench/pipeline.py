"""Whole-pipeline benchmark: Wan 2.1 T2V 1.3B denoising steps, dense SDPA against VMoBA.

What runs, per preset (`wan1.3b-480p-81f`, `wan1.3b-720p-81f`), in one process:
- the Wan 2.1 T2V 1.3B transformer with its real config (dim 1536, 30 layers, 12 heads of 128,
  ffn 8960, patch 1x2x2, text_dim 4096) and random weights, created on the GPU in bf16 (the
  modules diffusers keeps in fp32 when it loads real weights stay fp32); no weights are loaded;
- classifier-free guidance on: two transformer calls per step, with random text embeddings of
  the UMT5 output shape `[1, 512, 4096]` (the 5B text encoder runs once per request and is not
  part of a step);
- the body of `WanPipeline`'s denoising loop: both calls, the guidance mix, a UniPC (flow)
  scheduler step.

Measured (warm-up steps excluded; per-step CUDA events; median over steps):
1. `dense`: the stock diffusers processors, SDPA pinned to cuDNN (flash where cuDNN is missing).
2. `vmoba`: paper chunks (`VMoBAConfig.for_grid`), Triton kernels, two selections:
   `threshold_global` tau 0.25 (the paper's), and `topk` with k = round(C/4) blocks per layer
   kind (25% density by construction; the paper's (2, 6, 18) at 480p).
3. Separate passes, so that measuring does not slow the steps above: the achieved density
   (`collect_density`) and the time inside the attention op of every self-attention call
   (`collect_timing`, CUDA events) -> the share of a step spent in attention, before and after.
4. The real-config Wan VAE (fp32, random weights) decoding the latents, when it fits.

The 50-step generation is computed from the measured step times (unless
`--measured-generation` runs it): dense = 50 dense steps; VMoBA with `dense_steps=0.25` =
int(0.25 * 50) = 12 dense steps + 38 VMoBA steps; both plus the VAE decode when it was
measured. Every record's `method` says how its numbers were obtained.

Random weights make attention unlike a trained model's: the `threshold_global` density is what
these weights and inputs give (reported; about 0.20 in a CPU check of the real config cut to 6
layers, near the paper's 0.19-0.21), while `topk` fixes it. The latents are the pipeline's
initial Gaussian noise (`--latents noise`, default) or a smooth random field plus noise
(`--latents smooth`, the locality of denoised video latents; it gave the same density).

    python -m bench.pipeline                       # 480p and 720p (about 5 min on an H100)
    python -m bench.pipeline --quick               # 480p, few steps, no VAE (about a minute)
    python -m bench.pipeline --device cpu --tiny   # dry run of the code path on the tiny model
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.common import (
    RESULTS_DIR,
    environment,
    gpu_slug,
    topk_for_density,
    wan_transformer_config,
    write_json,
)

TEXT_TOKENS = 512  # WanPipeline pads prompts to max_sequence_length = 512
GUIDANCE = 5.0  # WanPipeline's default guidance scale

# Shape presets. flow_shift: the UniPC shift the Wan model card recommends at that size.
PRESETS = {
    "wan1.3b-480p-81f": dict(frames=81, height=480, width=832, flow_shift=3.0),
    "wan1.3b-720p-81f": dict(frames=81, height=720, width=1280, flow_shift=5.0),
    "tiny-17f-64": dict(frames=17, height=64, width=64, flow_shift=3.0),
}

# How many steps each pass runs: (warm-up, measured) for the speed passes; measured for the
# density and timing passes (run after the speed pass, so kernels are compiled by then).
FULL_COUNTS = dict(warmup=2, measure=6, density=2, timing=3)
QUICK_COUNTS = dict(warmup=1, measure=3, density=1, timing=2)


# -- model and inputs ---------------------------------------------------------------------------


def build_transformer(config: dict, device, dtype, seed: int = 0):
    """A random-weight `WanTransformer3DModel` made on `device`: `dtype`, except the modules
    diffusers keeps in fp32 when it loads a checkpoint (`_keep_in_fp32_modules`)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)
    return model.eval().requires_grad_(False)


def make_latents(channels, grid_latent, device, kind: str, seed: int = 1):
    """Initial latents `[1, C, T, h, w]` (fp32, as the pipeline keeps them).

    `noise`: Gaussian (the pipeline's first step). `smooth`: a sum of 12 cosines over (t, y, x)
    with random frequencies of up to 3 cycles per axis and random channel mixes, plus half as
    much noise: the locality that denoised video latents have.
    """
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid_latent
    noise = torch.randn(1, channels, t, h, w, generator=gen)
    if kind == "noise":
        return noise.to(device)
    if kind != "smooth":
        raise ValueError(f"latents must be 'noise' or 'smooth', got {kind!r}")
    axes = torch.meshgrid(
        torch.arange(t) / t, torch.arange(h) / h, torch.arange(w) / w, indexing="ij"
    )
    coords = torch.stack(axes, -1)  # [t, h, w, 3]
    waves = 12
    freqs = torch.rand(waves, 3, generator=gen) * 3.0 * 2 * math.pi
    phase = torch.rand(waves, generator=gen) * 2 * math.pi
    field = torch.cos(coords @ freqs.T + phase)  # [t, h, w, waves]
    mix = torch.randn(waves, channels, generator=gen) / math.sqrt(waves)
    smooth = (field @ mix).permute(3, 0, 1, 2)[None]  # [1, C, t, h, w]
    smooth = smooth / smooth.std()
    return (smooth + 0.5 * noise).to(device)


def make_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
    )


class Clock:
    """Marks on the GPU stream (CUDA events) or the host clock; read after one sync."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class Steps:
    """Runs denoising steps the way `WanPipeline.__call__` does, with CFG."""

    def __init__(self, transformer, scheduler, latents, cond, uncond, num_steps, clock):
        self.transformer, self.scheduler = transformer, scheduler
        self.latents, self.cond, self.uncond = latents, cond, uncond
        self.num_steps, self.clock = num_steps, clock
        self.dtype = transformer.patch_embedding.weight.dtype  # what WanPipeline casts latents to

    def run(self, warmup: int, measure: int) -> list:
        """Step times (ms) of steps `warmup .. warmup + measure - 1` of a fresh schedule."""
        if warmup + measure > self.num_steps:
            raise ValueError(
                f"{warmup}+{measure} steps do not fit a {self.num_steps}-step schedule"
            )
        self.scheduler.set_timesteps(self.num_steps, device=self.latents.device)
        self.scheduler.set_begin_index(0)
        latents = self.latents.clone()
        marks = []
        for i, t in enumerate(self.scheduler.timesteps[: warmup + measure]):
            start = self.clock.mark()
            latents = self._step(latents, t)
            end = self.clock.mark()
            if i >= warmup:
                marks.append((start, end))
        self.clock.sync()
        return [self.clock.ms(a, b) for a, b in marks]

    def _step(self, latents, t):
        x = latents.to(self.dtype)
        timestep = t.expand(latents.shape[0])
        cond = self.transformer(
            hidden_states=x, timestep=timestep, encoder_hidden_states=self.cond, return_dict=False
        )[0]
        uncond = self.transformer(
            hidden_states=x, timestep=timestep, encoder_hidden_states=self.uncond, return_dict=False
        )[0]
        noise = uncond + GUIDANCE * (cond - uncond)
        return self.scheduler.step(noise, t, latents, return_dict=False)[0]


# -- SDPA kernel --------------------------------------------------------------------------------


def sdpa_context(device, heads: int, head_dim: int, dtype):
    """`(name, context)`: SDPA restricted to cuDNN (fallback flash) if they run on this GPU."""
    if torch.device(device).type != "cuda":
        return "default (cpu)", nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, 4096, head_dim, device=device, dtype=dtype)
    for name, which in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            with sdpa_kernel([which]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize()
        except RuntimeError:
            continue
        # cuDNN first, flash for any shape cuDNN refuses (set_priority: torch >= 2.6)
        order = [which] + ([SDPBackend.FLASH_ATTENTION] if name == "cudnn" else [])

        def ctx(order=order):
            try:
                return sdpa_kernel(order, set_priority=True)
            except TypeError:
                return sdpa_kernel(order)

        return name, ctx
    return "default", nullcontext


# -- passes -------------------------------------------------------------------------------------


def vmoba_variants(grid, kernel: str):
    """`[(label, AttentionSettings)]`: the paper's threshold selection and a 25% top-k."""
    from vmoba.config import LAYER_KINDS
    from vmoba.diffusers import AttentionSettings
    from vmoba.partition import num_blocks

    base = AttentionSettings(dense_steps=0.0, kernel=kernel, collect_density=False)
    cfg = base.vmoba_config(grid)
    quarter = tuple(topk_for_density(0.25, num_blocks(grid, kind, cfg)) for kind in LAYER_KINDS)
    return [
        ("threshold_global tau=0.25", base.replace(select="threshold_global", threshold=0.25)),
        (f"topk {quarter}", base.replace(select="topk", topk=quarter)),
    ]


def attention_pass(handle, steps: Steps, settings, measure: int) -> dict:
    """Steps with timing on: attention ms per step and its share of the (timed) step."""
    with handle.use(settings.replace(collect_timing=True, collect_density=False)) as stats:
        times = steps.run(0, measure)
    per_step = stats["attention_ms"] / measure
    return {
        "attention_ms_per_step": per_step,
        "attention_share": per_step / statistics.mean(times),
        "attention_ms_by_kind_per_step": {
            k: v / measure for k, v in stats["attention_ms_by_kind"].items()
        },
    }


def density_pass(handle, steps: Steps, settings, measure: int) -> dict:
    with handle.use(settings.replace(collect_density=True)) as stats:
        steps.run(0, measure)
    return {
        "density": stats["density"],
        "density_by_kind": stats["density_by_kind"],
        "attention_flops_ratio": stats["attention_flops_ratio"],
    }


def vae_decode(latent_shape, device, vae_config, clock) -> dict:
    """Time one decode of random latents by a random-weight Wan VAE (fp32), if it fits."""
    from diffusers import AutoencoderKLWan

    vae = None
    try:
        torch.manual_seed(0)
        with torch.device(device):
            vae = AutoencoderKLWan(**vae_config).eval().requires_grad_(False)
        z = torch.randn(latent_shape, device=device)
        vae.decode(z[:, :, :2])  # warm-up: cuDNN picks its convolution algorithms
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = clock.mark()
        video = vae.decode(z).sample
        end = clock.mark()
        clock.sync()
        out = {"vae_decode_s": clock.ms(start, end) / 1e3, "video_shape": list(video.shape)}
        if clock.cuda:
            out["vae_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    except torch.cuda.OutOfMemoryError as exc:
        return {"vae_decode_s": None, "vae_error": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        del vae
        if clock.cuda:
            torch.cuda.empty_cache()


def run_preset(name, args, env) -> list:
    """All records of one preset."""
    from vmoba.diffusers import AttentionSettings, install_vmoba

    preset = PRESETS[name]
    device, dtype = args.device, (torch.float32 if args.tiny else torch.bfloat16)
    config = wan_transformer_config(tiny=args.tiny, num_layers=args.layers)
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    frames, height, width = preset["frames"], preset["height"], preset["width"]
    latent_grid = (1 + (frames - 1) // 4, height // 8, width // 8)
    pt, ph, pw = config["patch_size"]
    grid = (latent_grid[0] // pt, latent_grid[1] // ph, latent_grid[2] // pw)
    tokens = math.prod(grid)
    print(f"[{name}] grid {grid} = {tokens} tokens, {config['num_layers']} layers", flush=True)

    transformer = build_transformer(config, device, dtype)
    latents = make_latents(config["in_channels"], latent_grid, device, args.latents)
    gen = torch.Generator().manual_seed(2)
    text_shape = (1, TEXT_TOKENS, config["text_dim"])
    cond = torch.randn(text_shape, generator=gen).to(device, dtype)
    uncond = torch.randn(text_shape, generator=gen).to(device, dtype)
    scheduler = make_scheduler(preset["flow_shift"])
    clock = Clock(device)
    steps = Steps(transformer, scheduler, latents, cond, uncond, args.steps, clock)
    sdpa_name, sdpa = sdpa_context(
        device, config["num_attention_heads"], config["attention_head_dim"], dtype
    )
    cutoff = AttentionSettings(dense_steps=args.dense_steps).dense_cutoff(args.steps)

    common = dict(
        env,
        bench="pipeline",
        preset=name,
        resolution=f"{height}x{width}",
        frames=frames,
        grid=list(grid),
        tokens=tokens,
        model="Wan2.1-T2V-1.3B architecture, random weights"
        if not args.tiny
        else "tiny random Wan",
        num_layers=config["num_layers"],
        dtype=str(dtype).replace("torch.", ""),
        batch=1,
        cfg=True,
        text_tokens=TEXT_TOKENS,
        latents=args.latents,
        sdpa_kernel=sdpa_name,
        num_steps=args.steps,
        dense_steps=args.dense_steps,
        dense_step_count=cutoff,
        warmup_steps=counts["warmup"],
        measured_steps=counts["measure"],
    )
    records = []
    with torch.inference_mode(), sdpa():
        dense_times = steps.run(counts["warmup"], counts["measure"])
        dense_ms = statistics.median(dense_times)
        print(f"  dense ({sdpa_name}): {dense_ms:.1f} ms/step", flush=True)
        handle = install_vmoba(transformer, AttentionSettings(backend="dense"), scheduler=scheduler)
        try:
            dense_attn = attention_pass(
                handle, steps, AttentionSettings(backend="dense"), counts["timing"]
            )
        finally:
            handle.remove()
        records.append(
            dict(
                common,
                attention="dense",
                select=None,
                density=1.0,
                step_ms=dense_ms,
                step_ms_all=dense_times,
                **dense_attn,
            )
        )

        for label, settings in vmoba_variants(grid, args.kernel):
            record = dict(
                common,
                attention="vmoba",
                select=settings.select,
                variant=label,
                settings=settings.to_dict(),
                chunks=_chunks(settings, grid),
            )
            handle = install_vmoba(transformer, settings, scheduler=scheduler)
            try:
                times = steps.run(counts["warmup"], counts["measure"])
                record.update(step_ms=statistics.median(times), step_ms_all=times)
                record.update(density_pass(handle, steps, settings, counts["density"]))
                record.update(attention_pass(handle, steps, settings, counts["timing"]))
                if args.measured_generation:
                    record.update(_measured_generation(handle, steps, settings, args))
            except Exception as exc:  # keep the other records; say what failed
                record.update(error=f"{type(exc).__name__}: {exc}")
                print(f"  {label}: FAILED {record['error']}", flush=True)
            finally:
                handle.remove()
            if "step_ms" in record:
                print(
                    f"  vmoba {label}: {record['step_ms']:.1f} ms/step, density {record.get('density')}",
                    flush=True,
                )
            records.append(record)

        if args.measured_generation:
            start = time.perf_counter()
            steps.run(0, args.steps)
            records[0]["denoise_measured_s"] = time.perf_counter() - start

    del transformer
    if clock.cuda:
        torch.cuda.empty_cache()
    vae = {"vae_decode_s": None, "vae_error": "skipped (--no-vae or --quick)"}
    if args.vae:
        from worker.tiny_model import VAE_CONFIG

        # {}: AutoencoderKLWan's defaults are Wan 2.1's VAE
        vae_config = VAE_CONFIG if args.tiny else {}
        vae = vae_decode((1, config["in_channels"], *latent_grid), device, vae_config, clock)
        print(f"  VAE decode: {vae}", flush=True)

    dense_gen = args.steps * dense_ms / 1e3
    for record in records:
        record.update(vae)
        if "step_ms" not in record:
            continue
        if record["attention"] == "dense":
            denoise = dense_gen
        else:
            denoise = (cutoff * dense_ms + (args.steps - cutoff) * record["step_ms"]) / 1e3
        decode = vae["vae_decode_s"] or 0.0
        record.update(
            denoise_s=denoise,
            generation_s=denoise + decode,
            step_speedup=dense_ms / record["step_ms"],
            generation_speedup=(dense_gen + decode) / (denoise + decode),
            method=_method(record, cutoff, args, vae["vae_decode_s"] is not None),
        )
    return records


def _measured_generation(handle, steps: Steps, settings, args) -> dict:
    with handle.use(settings.replace(dense_steps=args.dense_steps)) as stats:
        start = time.perf_counter()
        steps.run(0, args.steps)
        elapsed = time.perf_counter() - start
    return {"denoise_measured_s": elapsed, "measured_dense_steps": stats["dense_steps"]}


def _method(record, cutoff, args, with_vae: bool) -> str:
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    clock = "CUDA events" if torch.device(args.device).type == "cuda" else "host clock"
    step = (
        f"median of {counts['measure']} steps after {counts['warmup']} warm-up, {clock}, "
        "CFG (2 transformer calls) + UniPC step"
    )
    if record["attention"] == "dense":
        gen = f"generation_s = {args.steps} x dense step_ms"
    else:
        gen = (
            f"generation_s = {cutoff} x dense step_ms + {args.steps - cutoff} x vmoba step_ms "
            f"(dense_steps={args.dense_steps})"
        )
    gen += " + VAE decode (measured once)" if with_vae else " (no VAE decode)"
    extra = "; also run end to end: denoise_measured_s" if args.measured_generation else ""
    return (
        f"step_ms: {step}; {gen}, computed from measured step times, text encoder excluded{extra}"
    )


def _chunks(settings, grid) -> dict:
    cfg = settings.vmoba_config(grid)
    return {
        "temporal_chunk": cfg.temporal_chunk,
        "spatial_chunk": list(cfg.spatial_chunk),
        "st_chunk": list(cfg.st_chunk),
    }


# -- output -------------------------------------------------------------------------------------


def table(records) -> str:
    """A markdown table of the records (for the README)."""
    lines = [
        "| preset | attention | select | density | step ms | attention share | step speedup "
        "| generation s | generation speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "step_ms" not in r:
            lines.append(
                f"| {r['preset']} | {r['attention']} | {r.get('variant')} | error: {r.get('error')} "
                "| | | | | |"
            )
            continue
        density = f"{r['density']:.3f}" if r.get("density") is not None else "-"
        share = (
            f"{100 * r['attention_share']:.0f}%" if r.get("attention_share") is not None else "-"
        )
        lines.append(
            f"| {r['preset']} | {r['attention']} | {r.get('variant') or '-'} | {density} | {r['step_ms']:.0f} "
            f"| {share} | {r['step_speedup']:.2f}x | {r['generation_s']:.1f} | {r['generation_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="480p only, few steps, no VAE (about a minute)"
    )
    parser.add_argument(
        "--presets",
        default=None,
        help=f"comma-separated presets from {sorted(PRESETS)} (default: both 81-frame ones)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny random model (dry run of the code path)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="override the number of transformer blocks"
    )
    parser.add_argument(
        "--kernel", default=None, help="VMoBA kernel: triton (GPU default) | reference | auto"
    )
    parser.add_argument("--latents", default="noise", choices=["noise", "smooth"])
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the generation")
    parser.add_argument(
        "--dense-steps", type=float, default=0.25, help="fraction of steps run dense"
    )
    parser.add_argument("--no-vae", dest="vae", action="store_false", help="skip the VAE decode")
    parser.add_argument(
        "--measured-generation",
        action="store_true",
        help="also run every generation end to end (slow: minutes per preset at 720p)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/pipeline-<gpu>.json)"
    )
    args = parser.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(
            "no CUDA GPU: this benchmark needs one (or run --device cpu --tiny for a dry run)"
        )
    if not cuda and not args.tiny:
        parser.error("the real-size model on the CPU would take hours: add --tiny")
    if args.kernel is None:
        args.kernel = "triton" if cuda else "reference"
    if args.quick:
        args.vae = False
    if args.presets:
        presets = [p.strip() for p in args.presets.split(",")]
    elif args.tiny:
        presets = ["tiny-17f-64"]
    elif args.quick:
        presets = ["wan1.3b-480p-81f"]
    else:
        presets = ["wan1.3b-480p-81f", "wan1.3b-720p-81f"]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")

    env = environment(args.device)
    out = Path(args.out) if args.out else None
    if out is None and cuda and not args.tiny:
        out = RESULTS_DIR / f"pipeline-{gpu_slug(env['gpu'])}{'-quick' if args.quick else ''}.json"
    records = []
    for name in presets:
        records.extend(run_preset(name, args, env))
        if out is not None:  # after every preset, so a later failure keeps what was measured
            write_json(out, records)
    print()
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
