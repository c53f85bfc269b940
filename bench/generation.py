"""Whole text-to-video generations, measured end to end: stock diffusers against ours.

One process, one card, one random-weight pipeline (`wan2.1-t2v-1.3b-random`: the Wan 2.1 T2V
1.3B transformer, the UMT5-XXL-shaped text encoder and the Wan VAE at full size, built in code),
and each variant of `VARIANTS` in turn on the same modules:

- `stock-eager`: the stock diffusers pipeline as a user loads it (VAE in fp32);
- `stock-compiled`: the same with diffusers' one-line compile of the transformer,
  `compile_repeated_blocks(fullgraph=True)` (the compile diffusers recommends: the same step
  time as compiling the whole model, in a fraction of the compile time);
- `vmoba`: what our worker runs: VMoBA installed with the model's default request (training-free
  top-k, the first 25% of the steps dense, `vmoba.defaults`), then `worker.speedups` (the
  compiled blocks around VMoBA's op, the VAE in bf16) and the worker's streamed decode
  (`worker.decode.stream_decode`: frames converted to uint8 on the device and handed, a latent
  frame at a time, to the mp4 encoder `worker.video.Mp4Writer`, which encodes while the VAE
  decodes the rest).

SDPA tries cuDNN first for every variant (`sdpa_priority`), so the dense attention is the same
kernel everywhere. Each variant first runs warm-up generations (compilation, Triton
and cuDNN autotuning; their time is recorded as `warmup_s`): one step at a size larger in every
dimension, then two steps at the measured size, as the worker's warm-up does (after two sizes
the compiled code is dynamic in the sizes, so no later request recompiles). Then the measured
generation: prompt encoding, `--steps` denoising steps with classifier-free guidance (guidance
5), the VAE decode, and the mp4 encode, each timed with a device sync at its end; the denoising
steps are timed one by one (sync in the step callback). The stock variants decode, then encode
(`worker.video.encode_mp4`); ours overlaps the two, so its `decode_s` ends at the last decoded
frame and its `encode_s` is what the encoder takes after that; `total_s` is the wall time.

`--vae` adds the VAE decode alone in each candidate precision and layout (fp32, bf16, each
untiled and tiled), with peak memory and the difference of the decoded video from fp32's (max
abs on [0, 1] frames, PSNR of the uint8 frames).

The `vmoba` variant also checks that its streamed decode gives the pipeline's frames bit for bit
(`streamed_bit_identical`, `streamed_matches_plain`) and runs a short timing pass
(`collect_timing`: one dense and one VMoBA step, attention timed by CUDA events inside the op),
which splits each variant's step time into attention and the rest (`profile` in the summary
record).

Results go to `--out` (default `bench/results/generation-<gpu>.json`); records of the same
size, variant and card already there are replaced, others kept, so the variants of one size can
be measured in separate calls on one warm machine.

    python -m bench.generation --size 480p                          # all variants, ~4 min
    python -m bench.generation --size 720p --variants stock-eager   # one variant per call
    python -m bench.generation --size tiny --device cpu --backend aot_eager   # dry run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS_DIR, environment, gpu_slug, write_json

MODEL = "wan2.1-t2v-1.3b-random"
SIZES = {"480p": (81, 480, 832), "720p": (81, 720, 1280), "tiny": (9, 64, 64)}
VARIANTS = ("stock-eager", "stock-compiled", "vmoba")
PROMPT = "a red fox running through snow at dawn, cinematic"
NEGATIVE = "blurry, low quality"
GUIDANCE = 5.0
FPS = 16


def build_pipe(size: str, device: str):
    if size == "tiny":
        from worker.tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline(0).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, "tiny"
    from worker.random_model import build_random_pipeline

    return build_random_pipeline(MODEL, device=device), MODEL


def sdpa_priority(device):
    """`(name, context)`: SDPA tries cuDNN first, then flash, efficient, math. A priority, not a
    restriction: the transformer's bf16 heads of 128 get cuDNN (as in bench/pipeline.py), the
    VAE's fp32 attention (heads of 384) falls back as it does by default."""
    if torch.device(device).type != "cuda":
        return "default (cpu)", nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return "cudnn first", lambda: sdpa_kernel(order, set_priority=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset(pipe, handle):
    """Undo a variant: stock processors, eager blocks, fp32 VAE, no compiled code."""
    if handle is not None:
        handle.remove()
    for block in pipe.transformer.blocks:
        block._compiled_call_impl = None  # what nn.Module.compile set
    torch._dynamo.reset()
    pipe.vae.to(torch.float32)


def prepare(pipe, variant: str, device: str, grid, backend: str):
    """Set `pipe` up as `variant`; returns `(handle, settings)` (`None`s for stock)."""
    if variant == "stock-eager":
        return None, None
    if variant == "stock-compiled":
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        return None, None
    from vmoba.defaults import recommended_settings
    from vmoba.diffusers import AttentionSettings, install_vmoba
    from worker.speedups import apply_speedups

    handle = install_vmoba(pipe)
    apply_speedups(
        {"t2v": pipe}, device=device, compile=True, vae="auto", compile_options={"backend": backend}
    )
    return handle, AttentionSettings.from_dict(recommended_settings(grid, vmoba_trained=False))


def encode_prompts(pipe, device):
    """The benchmark prompt's and negative prompt's embeddings (classifier-free guidance)."""
    return pipe.encode_prompt(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        do_classifier_free_guidance=True,
        device=torch.device(device),
    )


def denoise(pipe, embeds, size, steps: int, output_type: str, callback):
    """One pipeline call of the benchmark (seed 0) on `encode_prompts`' embeddings."""
    cond, uncond = embeds
    frames_n, height, width = size
    return pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_frames=frames_n,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        callback_on_step_end=callback,
    )


def generate(pipe, handle, settings, size, steps, device, *, decode=True, encode=True):
    """One generation; stage times in seconds, per-step times in ms, the frames' mean.

    The stock variants decode as a user of diffusers does (`output_type="np"`, frames converted
    on the host), then encode (`worker.video.encode_mp4`). Ours runs the worker's path: latents
    out of the pipeline, `worker.decode.stream_decode` handing each latent frame's frames to a
    `worker.video.Mp4Writer` while the VAE decodes the rest. `decode_s` runs from the last step
    to the last decoded frame, `encode_s` from there to the written mp4 (as the worker's
    `decoding_s` and `encoding_s`); `decode=False` stops at the latents."""
    from worker.decode import stream_decode
    from worker.video import Mp4Writer, encode_mp4, to_uint8_frames

    stock = handle is None
    marks: list[float] = []

    def on_step(_pipe, _i, _t, _kwargs):
        sync(device)
        marks.append(time.perf_counter())
        return {}

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds = encode_prompts(pipe, device)
    sync(device)
    t1 = time.perf_counter()
    use = handle.use(settings) if handle is not None else nullcontext({})
    with torch.no_grad(), use as stats:
        out = denoise(pipe, embeds, size, steps, "np" if stock and decode else "latent", on_step)
    record: dict = {"text_encode_s": t1 - t0, "denoise_s": marks[-1] - t1}
    if decode:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "video.mp4"
            if stock:
                sync(device)
                t2 = time.perf_counter()
                frames = to_uint8_frames(out.frames)
                if encode:
                    encode_mp4(frames, path, fps=FPS)
            else:
                with Mp4Writer(path, fps=FPS) as mp4:
                    frames = stream_decode(pipe, out.frames, mp4.write if encode else None)
                    sync(device)
                    t2 = time.perf_counter()
                    if encode:
                        mp4.finish()
            t3 = time.perf_counter()
        record.update(
            decode_s=t2 - marks[-1],
            encode_s=t3 - t2,
            total_s=t3 - t0,
            frames_mean=float(frames.mean()),
        )
    record["step_ms"] = [1e3 * (b - a) for a, b in zip([t1, *marks[:-1]], marks)]
    record["attention_stats"] = dict(stats)
    return record


def bumped(size):
    """A size larger in every dimension (frames by 4, sides by 16): warming up at two sizes
    leaves dynamic-shape compiled code, so later sizes do not recompile."""
    frames, height, width = size
    return frames + 4, height + 16, width + 16


def run_variant(pipe, variant, size, args) -> dict:
    from contract.models import get_model

    spec = get_model(MODEL) if args.size != "tiny" else None
    grid = spec.grid(*size) if spec else (1 + (size[0] - 1) // 4, size[1] // 16, size[2] // 16)
    dev = args.device
    handle, settings = prepare(pipe, variant, dev, grid, args.backend)
    try:
        t0 = time.perf_counter()
        if variant != "stock-eager":
            generate(pipe, handle, settings, bumped(size), 1, dev, decode=False)
        generate(pipe, handle, settings, size, 2, dev, encode=False)
        warmup_s = time.perf_counter() - t0
        graphs = _compiled_graphs()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        measured = generate(pipe, handle, settings, size, args.steps, dev)
        record = {
            "kind": "generation",
            "variant": variant,
            "size": list(size),
            "grid": list(grid),
            "steps": args.steps,
            "warmup_s": warmup_s,
            **measured,
            "settings": settings.to_dict() if settings is not None else None,
        }
        if dev == "cuda":
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        cutoff = settings.dense_cutoff(args.steps) if settings is not None else args.steps
        step_ms = measured["step_ms"]
        # the first step of each kind after a switch pays one-off work (allocations): medians
        record["dense_step_ms"] = statistics.median(step_ms[:cutoff]) if cutoff else None
        record["vmoba_step_ms"] = (
            statistics.median(step_ms[cutoff:]) if cutoff < len(step_ms) else None
        )
        if handle is not None:
            record["timing_pass"] = timing_pass(pipe, handle, settings, size, dev)
        # graphs dynamo compiled after the warm-up (the measured call and the timing pass, which
        # has other settings): 0 when nothing recompiled
        record["recompiled_graphs"] = _compiled_graphs() - graphs
        if handle is not None:
            record["streamed_bit_identical"] = streamed_matches_plain(
                pipe, handle, settings, size, dev
            )
        return record
    finally:
        reset(pipe, handle)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def streamed_matches_plain(pipe, handle, settings, size, device) -> bool:
    """Whether the worker's streamed decode gives the frames the pipeline's own decode does
    (`output_type="pt"`, uint8 on the device), bit for bit, on this card and VAE dtype: one
    2-step call decoded by the pipeline, its final latents (kept by the step callback) decoded
    again by `worker.decode.stream_decode`."""
    from worker.decode import stream_decode
    from worker.video import device_frames_to_uint8

    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad(), handle.use(settings):
        out = denoise(pipe, encode_prompts(pipe, device), size, 2, "pt", keep)
        plain = device_frames_to_uint8(out.frames)
        del out
        return bool(np.array_equal(stream_decode(pipe, final["latents"]), plain))


def timing_pass(pipe, handle, settings, size, device) -> dict:
    """Attention ms of one dense and one VMoBA step (the op timed with CUDA events)."""
    timed = settings.replace(collect_timing=True, dense_steps=0.5)
    rec = generate(pipe, handle, timed, size, 2, device, decode=False)
    by_kind = rec["attention_stats"]["attention_ms_by_kind"]
    sparse_ms = sum(v for k, v in by_kind.items() if k != "dense")
    return {
        "dense_attention_ms": by_kind.get("dense"),
        "vmoba_attention_ms": sparse_ms,
        "step_ms": rec["step_ms"],
    }


def vae_records(pipe, size, device) -> list:
    """The VAE decode alone: fp32 / bf16, untiled / tiled; time, peak memory, difference."""
    from worker.video import to_uint8_frames

    frames, height, width = size
    vae = pipe.vae
    z_dim = vae.config.z_dim
    shape = (1, z_dim, 1 + (frames - 1) // 4, height // 8, width // 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    ref = None
    records = []
    for dtype in (torch.float32, torch.bfloat16):
        for tiled in (False, True):
            vae.to(dtype)
            vae.enable_tiling() if tiled else vae.disable_tiling()
            with torch.no_grad():
                vae.decode(z[:, :, :2].to(dtype))  # warm-up: cuDNN picks its algorithms
                sync(device)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                video = vae.decode(z.to(dtype)).sample
                sync(device)
                elapsed = time.perf_counter() - t0
            x = ((video.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0).cpu()  # F H W 3
            del video
            rec = {
                "kind": "vae",
                "size": list(size),
                "dtype": str(dtype).replace("torch.", ""),
                "tiled": tiled,
                "decode_s": elapsed,
            }
            if device == "cuda":
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if ref is None:
                ref = x
            else:
                rec["max_abs_vs_fp32"] = float((x - ref).abs().max())
                a = to_uint8_frames(x.numpy()).astype(np.float64)
                b = to_uint8_frames(ref.numpy()).astype(np.float64)
                mse = float(((a - b) ** 2).mean())
                rec["psnr_vs_fp32_db"] = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
            records.append(rec)
    vae.disable_tiling()
    vae.to(torch.float32)
    return records


def profile(records) -> dict | None:
    """Step time split into attention and the rest, per variant (from the records of one size)."""
    by = {r["variant"]: r for r in records if r.get("kind") == "generation"}
    ours = by.get("vmoba")
    if ours is None or "timing_pass" not in ours:
        return None
    dense_att = ours["timing_pass"]["dense_attention_ms"]
    sparse_att = ours["timing_pass"]["vmoba_attention_ms"]
    out = {"dense_attention_ms": dense_att, "vmoba_attention_ms": sparse_att}
    for name, r in by.items():
        if r.get("dense_step_ms") and dense_att is not None:
            out[f"{name} dense step non-attention ms"] = r["dense_step_ms"] - dense_att
        if r.get("vmoba_step_ms"):
            out[f"{name} vmoba step non-attention ms"] = r["vmoba_step_ms"] - sparse_att
    return out


def merge(path: Path, new: list, gpu: str) -> list:
    """Records in `path` that `new` does not replace (same kind, size, variant/dtype, card)."""

    def key(r):
        return (
            r.get("kind"),
            tuple(r.get("size", ())),
            r.get("variant"),
            r.get("dtype"),
            r.get("tiled"),
            r.get("gpu"),
        )

    old = json.loads(path.read_text()) if path.exists() else []
    replaced = {key(r) for r in new}
    kept = [r for r in old if r.get("kind") != "summary" and key(r) not in replaced]
    return kept + new


def summarize(records, gpu: str) -> list:
    out = []
    for size in sorted({tuple(r["size"]) for r in records if r.get("gpu") == gpu}):
        same = [r for r in records if tuple(r["size"]) == size and r.get("gpu") == gpu]
        gen = {r["variant"]: r for r in same if r.get("kind") == "generation"}
        s: dict = {"kind": "summary", "gpu": gpu, "size": list(size)}
        for name, r in gen.items():
            s[f"{name} total_s"] = r["total_s"]
            s[f"{name} commit"] = r["commit"]
        if "vmoba" in gen:
            for base in ("stock-eager", "stock-compiled"):
                if base in gen:
                    s[f"speedup vs {base}"] = gen[base]["total_s"] / gen["vmoba"]["total_s"]
        s["profile"] = profile(same)
        out.append(s)
    return out


def table(records) -> str:
    lines = [
        f"{'size':>14} {'variant':>15} {'total s':>8} {'text':>6} {'denoise':>8} "
        f"{'decode':>7} {'encode':>7} {'warmup':>7} {'dense ms':>9} {'vmoba ms':>9}"
    ]
    for r in records:
        if r.get("kind") != "generation":
            continue
        size = "x".join(map(str, r["size"]))
        dense = r["dense_step_ms"] or float("nan")
        sparse = r["vmoba_step_ms"] or float("nan")
        lines.append(
            f"{size:>14} {r['variant']:>15} {r['total_s']:8.1f} {r['text_encode_s']:6.2f} "
            f"{r['denoise_s']:8.1f} {r['decode_s']:7.2f} {r['encode_s']:7.2f} "
            f"{r['warmup_s']:7.1f} {dense:9.0f} {sparse:9.0f}"
        )
    for r in records:
        if r.get("kind") == "vae":
            lines.append(
                f"vae {r['dtype']} tiled={r['tiled']}: {r['decode_s']:.2f} s, "
                f"peak {r.get('peak_gib', 0):.1f} GiB, psnr {r.get('psnr_vs_fp32_db')}, "
                f"max abs {r.get('max_abs_vs_fp32')}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="480p")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--vae", action="store_true", help="also the VAE decode variants")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        parser.error(f"variants must be among {VARIANTS}")
    size = SIZES[args.size]
    env = environment(args.device)
    pipe, model = build_pipe(args.size, args.device)
    sdpa, ctx = sdpa_priority(args.device)
    out = args.out or RESULTS_DIR / f"generation-{gpu_slug(env['gpu'])}.json"
    records: list = []
    merged: list = []

    def save(new):  # after every variant, so a call cut short keeps what it measured
        records.extend(new)
        merged = merge(out, new, env["gpu"])
        write_json(out, merged + summarize(merged, env["gpu"]))
        return merged

    with ctx():
        if args.vae:
            vae = vae_records(pipe, size, args.device)
            merged = save([{**env, "model": model, **r} for r in vae])
        for variant in variants:
            rec = run_variant(pipe, variant, size, args)
            merged = save([{**env, "model": model, "sdpa": sdpa, **rec}])
            print(table(records[-1:]), flush=True)
    print(table(records))
    print(json.dumps(summarize(merged, env["gpu"]), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
