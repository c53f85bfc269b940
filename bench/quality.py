"""How far VMoBA moves the output from dense attention (issue #16): videos, and synthetic layers.

Videos (default): every prompt is generated with the same seed once with dense attention and
once per VMoBA setting, on any registry model, through the worker's own code path
(`worker.families.build_pipelines`, `vmoba.diffusers.install_vmoba`, `handle.use(settings)`;
no Redis). Per video it reports PSNR and SSIM against the dense video (scikit-image), the
attention-level drift (`AttentionSettings.collect_drift`: relative L2 error and softmax mass
kept, per layer kind and step), the achieved density and the wall-clock time, as JSON plus a
printed table, and draws a contact sheet PNG (dense row, one row per setting, a few frames) so a
person can look.

    python -m bench.quality                                   # tiny twin on the CPU (seconds)
    python -m bench.quality --model wan2.1-t2v-1.3b-random --device cuda --num-prompts 2
    python -m bench.quality --setting '{"select": "topk", "topk": [2, 6, 18]}' \\
        --setting '{"select": "threshold_global", "threshold": 0.25}' --prompts prompts.txt

`--setting` is a JSON attention object like a request's `attention`: fields it leaves out take
the model's defaults at the video's grid (`vmoba.defaults.recommended_settings`). Default
settings: the model's own defaults, and `threshold_global` with tau 0.25.

PSNR of two identical videos is infinite: the JSON writes it as the string `"inf"` (JSON has no
infinity), the table as `inf`. SSIM of identical videos is 1.

Synthetic (`--synthetic`, `bench.quality_synthetic`): VMoBA's token-level selection against a
128 x 128 tile-level top-k mask of the same density on locality-structured inputs at the three
Wan grids. See docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench.common import RESULTS_DIR, environment, gpu_slug, write_json

# A small built-in prompt set: different motion, texture and composition.
DEFAULT_PROMPTS = (
    "a red fox running through fresh snow in a pine forest, morning light",
    "ocean waves breaking on black volcanic rocks at sunset, slow motion",
    "a busy city street at night in the rain, neon signs reflected on the asphalt",
    "a close-up of a hummingbird hovering beside a purple flower",
)
DEFAULT_SEED = 42
THRESHOLD_GLOBAL = {"select": "threshold_global", "threshold": 0.25}
SHEET_FRAMES = 4
SHEET_WIDTH = 256  # pixels per frame in the contact sheet (frames are scaled to it)
INF = "inf"  # how the JSON writes an infinite PSNR


# -- metrics ----------------------------------------------------------------------------------------


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of `test` against `ref` (uint8 arrays of one shape, data range 255), over all
    their pixels: `10 log10(255^2 / MSE)`; `math.inf` when they are identical."""
    from skimage.metrics import peak_signal_noise_ratio

    _check_pair(ref, test)
    with np.errstate(divide="ignore"):  # identical: MSE 0, log of infinity
        return float(peak_signal_noise_ratio(ref, test, data_range=255))


def ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """SSIM of two uint8 RGB frames `[H, W, 3]` (scikit-image, channels averaged, 7x7 window or
    the largest odd window the frame allows); 1 for identical frames."""
    from skimage.metrics import structural_similarity

    _check_pair(ref, test)
    win = min(7, *ref.shape[:2])
    win -= 1 - win % 2  # odd
    return float(structural_similarity(ref, test, channel_axis=-1, data_range=255, win_size=win))


def _check_pair(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape or ref.dtype != np.uint8 or test.dtype != np.uint8:
        raise ValueError(
            f"need two uint8 arrays of one shape, got {ref.dtype}{ref.shape} and {test.dtype}{test.shape}"
        )


def video_metrics(ref: np.ndarray, test: np.ndarray) -> dict:
    """PSNR and SSIM of a video `[F, H, W, 3]` uint8 against the reference video.

    `psnr`: over the whole video (one MSE over every frame); `ssim`: mean of the frames' SSIM;
    `psnr_by_frame`, `ssim_by_frame`: per frame. Infinite PSNRs as `math.inf` (see `jsonable`).
    """
    _check_pair(ref, test)
    by_frame = [ssim(a, b) for a, b in zip(ref, test)]
    return {
        "psnr": psnr(ref, test),
        "ssim": float(np.mean(by_frame)),
        "psnr_by_frame": [psnr(a, b) for a, b in zip(ref, test)],
        "ssim_by_frame": by_frame,
    }


def jsonable(value):
    """`value` with every infinite float written as the string `"inf"` (`"-inf"`), NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (INF if value > 0 else "-" + INF)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def mean(values) -> Optional[float]:
    """Mean of numbers (`None` entries skipped; `None` if none); an infinite value makes it inf."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# -- settings ---------------------------------------------------------------------------------------


def parse_setting(text: str) -> dict:
    """A `--setting` value: a JSON object of attention settings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--setting must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--setting must be a JSON object, got {text!r}")
    return value


def resolve_settings(spec, grid, given: list, *, kernel: str, drift: bool) -> list:
    """`AttentionSettings` of each VMoBA run: the model's defaults at `grid` < the harness's
    kernel and statistics < the `--setting` object (as a request's attention object is merged).
    Default: the model's own settings and threshold_global tau 0.25 (duplicates dropped)."""
    from vmoba.config import merge_attention_settings
    from vmoba.defaults import recommended_settings

    model = recommended_settings(grid, vmoba_trained=spec.vmoba_trained)
    ours = {"kernel": kernel, "collect_drift": drift, "collect_density": True}
    out: list = []
    for setting in given or [{}, THRESHOLD_GLOBAL]:
        settings, _ = merge_attention_settings(model, ours, setting)
        if settings.backend != "vmoba":
            raise ValueError(
                f"--setting {setting}: the dense run is always made; give VMoBA settings"
            )
        if settings not in out:
            out.append(settings)
    return out


def label(settings, grid) -> str:
    """A short name: `topk 2/6/18, dense 25%`, `threshold_global tau=0.25, dense 25%`."""
    if settings.backend == "dense":
        return "dense"
    if settings.select == "topk":
        what = "topk " + "/".join(str(k) for k in settings.topk)
    else:
        what = f"{settings.select} tau={settings.threshold:g}"
    chunks = "".join(f", {k}={v}" for k, v in settings.chunks.items())
    return f"{what}, dense {settings.dense_steps:.0%}{chunks}"


# -- videos -----------------------------------------------------------------------------------------


def load_prompts(args) -> list:
    if args.prompts:
        lines = Path(args.prompts).read_text().splitlines()
        prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    else:
        prompts = list(DEFAULT_PROMPTS)
    if args.num_prompts:
        prompts = prompts[: args.num_prompts]
    if not prompts:
        raise SystemExit("no prompts")
    return prompts


def model_spec(args):
    """The registry model `--model`, or with `--weights` a checkpoint of that architecture;
    `--vmoba-trained` marks weights fine-tuned with VMoBA (their defaults: threshold_global)."""
    import dataclasses

    from contract.models import custom_model, get_model

    try:
        spec = get_model(args.model)
    except KeyError as exc:
        raise SystemExit(str(exc)) from None
    if args.weights:
        return custom_model(args.weights, spec.id, vmoba_trained=args.vmoba_trained)
    return dataclasses.replace(spec, vmoba_trained=True) if args.vmoba_trained else spec


def video_shape(spec, args) -> tuple[int, int, int]:
    """`(frames, height, width)` from the flags or the model's defaults, checked against the model."""
    d = spec.defaults
    frames, height, width = (
        args.frames or d.num_frames,
        args.height or d.height,
        args.width or d.width,
    )
    if not spec.frames_ok(frames):
        raise SystemExit(f"--frames {frames}: {spec.id} needs {spec.vae_scale[0]}k+1 frames")
    m = spec.size_multiple
    if height % m or width % m:
        raise SystemExit(
            f"--height/--width must be multiples of {m} for {spec.id}, got {height}x{width}"
        )
    return frames, height, width


class Generator:
    """One model's t2v pipeline with VMoBA installed; `run(settings)` makes one video."""

    def __init__(self, spec, args, device: str):
        import torch

        from vmoba.diffusers import AttentionSettings, install_vmoba
        from worker.families import build_pipelines

        if "t2v" not in spec.tasks:
            raise SystemExit(f"{spec.id} does not do text-to-video; the harness runs t2v models")
        self.spec, self.device = spec, device
        self.cuda = torch.device(device).type == "cuda"
        t0 = time.perf_counter()
        self.pipe = build_pipelines(spec, device=device, dtype=args.dtype, seed=args.model_seed)[
            "t2v"
        ]
        self.handle = install_vmoba(
            self.pipe, AttentionSettings(backend="dense", kernel=args.kernel)
        )
        self.build_s = time.perf_counter() - t0
        self.dtype = str(next(self.pipe.transformer.parameters()).dtype).removeprefix("torch.")

    def encode(self, prompt: str, negative: str, cfg: bool):
        import torch

        from worker.families import prompt_kwargs

        with torch.no_grad():
            return self.pipe.encode_prompt(
                prompt=prompt,
                negative_prompt=negative,
                do_classifier_free_guidance=cfg,
                device=torch.device(self.device),
                **prompt_kwargs(self.spec),
            )

    def run(self, settings, embeds, shape, *, steps: int, guidance: float, seed: int) -> dict:
        """`{"frames": uint8 [F, H, W, 3], "wall_s", "denoising_s", "decoding_s", "stats"}`."""
        import torch

        from worker.families import call_kwargs
        from worker.runtime import flow_shift_set
        from worker.video import to_uint8_frames

        frames, height, width = shape
        pos, neg = embeds
        cfg = guidance > 1.0
        marks: dict = {}

        def callback(_pipe, i, _t, _kwargs):
            if i + 1 == steps:
                self._sync()
                marks["denoised"] = time.perf_counter()
            return {}

        shift = self.spec.defaults.flow_shift(width, height)
        with flow_shift_set(self.pipe, shift), self.handle.use(settings) as stats:
            self._sync()
            t0 = time.perf_counter()
            out = self.pipe(
                prompt_embeds=pos,
                negative_prompt_embeds=neg if cfg else None,
                num_frames=frames,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="np",
                callback_on_step_end=callback,
                **call_kwargs(self.spec, "t2v", guidance_scale=guidance),
            )
            self._sync()
            t1 = time.perf_counter()
        t_den = marks.get("denoised", t1)
        return {
            "frames": to_uint8_frames(out.frames),
            "wall_s": t1 - t0,
            "denoising_s": t_den - t0,
            "decoding_s": t1 - t_den,
            "stats": dict(stats),
        }

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def run_videos(args) -> dict:
    """The dense-against-VMoBA video comparison; returns the JSON record (also written)."""
    import torch

    from vmoba.diffusers import AttentionSettings

    spec = model_spec(args)
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    shape = video_shape(spec, args)
    frames, height, width = shape
    grid = spec.grid(*shape)
    steps = args.steps or spec.defaults.num_inference_steps
    guidance = spec.defaults.guidance_scale if args.guidance is None else args.guidance
    prompts = load_prompts(args)
    seeds = [args.seed + i for i in range(len(prompts))]
    dense = AttentionSettings(backend="dense", kernel=args.kernel)
    sparse = resolve_settings(spec, grid, args.setting, kernel=args.kernel, drift=args.drift)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{spec.id} on {device}: {frames} frames {height}x{width} (grid {grid}), {steps} steps, "
        f"{len(prompts)} prompt(s), {len(sparse)} VMoBA setting(s)",
        file=sys.stderr,
    )

    gen = Generator(spec, args, device)
    if args.warmup:  # compile kernels and settle the allocator at this size, one step per setting
        embeds = gen.encode("warm-up", "", guidance > 1.0)
        for s in [dense, *sparse]:
            gen.run(
                s.replace(dense_steps=0.0, collect_drift=False),
                embeds,
                shape,
                steps=1,
                guidance=guidance,
                seed=0,
            )

    runs: dict[int, list] = {i: [] for i in range(len(sparse) + 1)}  # 0: dense
    sheets = []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds)):
        t0 = time.perf_counter()
        embeds = gen.encode(prompt, spec.defaults.negative_prompt, guidance > 1.0)
        encode_s = time.perf_counter() - t0
        ref = gen.run(dense, embeds, shape, steps=steps, guidance=guidance, seed=seed)
        rows: list[tuple[str, np.ndarray, Optional[dict]]] = [("dense", ref["frames"], None)]
        runs[0].append(_record(p, seed, ref, encode_s, None))
        _save_video(args, ref["frames"], spec, f"p{p}-dense")
        for i, s in enumerate(sparse, start=1):
            out = gen.run(s, embeds, shape, steps=steps, guidance=guidance, seed=seed)
            metrics = video_metrics(ref["frames"], out["frames"])
            runs[i].append(_record(p, seed, out, encode_s, metrics))
            rows.append((label(s, grid), out["frames"], metrics))
            _save_video(args, out["frames"], spec, f"p{p}-s{i}")
            print(
                f"  prompt {p} {label(s, grid)}: PSNR {_fmt(metrics['psnr'], '.2f')} dB, "
                f"SSIM {metrics['ssim']:.3f}",
                file=sys.stderr,
            )
        sheets.append((prompt, seed, rows))

    out_path = (
        Path(args.out) if args.out else RESULTS_DIR / f"quality-{_slug(device, spec.id)}.json"
    )
    sheet_path = Path(args.sheet) if args.sheet else out_path.with_suffix(".png")
    contact_sheet(
        sheets, sheet_path, frames_per_row=args.sheet_frames, frame_width=args.sheet_width
    )

    dense_wall = mean(r["wall_s"] for r in runs[0])
    results = []
    for i, s in enumerate([dense, *sparse]):
        videos = runs[i]
        wall = mean(v["wall_s"] for v in videos)
        results.append(
            {
                "name": label(s, grid),
                "settings": s.to_dict(),
                "chunks": None if i == 0 else _chunks(s, grid),
                "summary": {
                    "psnr": None if i == 0 else mean(v["psnr"] for v in videos),
                    "ssim": None if i == 0 else mean(v["ssim"] for v in videos),
                    "density": None if i == 0 else mean(v["density"] for v in videos),
                    "rel_l2": None
                    if i == 0
                    else mean(v["drift"]["rel_l2"] for v in videos if v["drift"]),
                    "mass_kept": None
                    if i == 0
                    else mean(v["drift"]["mass_kept"] for v in videos if v["drift"]),
                    "wall_s": wall,
                    "denoising_s": mean(v["denoising_s"] for v in videos),
                    "speedup": (dense_wall / wall) if (dense_wall and wall) else None,
                },
                "videos": videos,
            }
        )
    record = {
        "bench": "quality",
        **environment(device),
        "device": device,
        "model": spec.id,
        "weights": spec.weights,
        "vmoba_trained": spec.vmoba_trained,
        "dtype": gen.dtype,
        "kernel": args.kernel,
        "frames": frames,
        "height": height,
        "width": width,
        "grid": list(grid),
        "tokens": math.prod(grid),
        "steps": steps,
        "guidance_scale": guidance,
        "flow_shift": spec.defaults.flow_shift(width, height),
        "prompts": prompts,
        "seeds": seeds,
        "warmup": args.warmup,
        "build_s": gen.build_s,
        "collect_drift": args.drift,
        "contact_sheet": _display_path(sheet_path),
        "results": results,
        "notes": [
            "psnr/ssim: each VMoBA video against the dense video of the same prompt and seed "
            "(scikit-image; PSNR over all frames, data range 255; SSIM the mean over frames). "
            'An infinite PSNR (identical videos) is written as the string "inf".',
            "drift: attention-level, over the sparse self-attention calls (dense steps are not "
            "measured): rel_l2 = sqrt(sum |o_vmoba - o_dense|^2 / sum |o_dense|^2) on sampled query "
            "rows, mass_kept = mean share of the dense softmax mass on the attended keys.",
            "wall_s: the pipeline call (denoising + VAE decode), prompt encoding excluded; with "
            "collect_drift the sparse runs include the drift measurement (a second selection and "
            "dense attention for the sampled rows per sparse call).",
        ],
    }
    write_json(out_path, jsonable(record))
    print(table(record))
    return record


def _record(
    prompt_index: int, seed: int, run: dict, encode_s: float, metrics: Optional[dict]
) -> dict:
    stats = run["stats"]
    rec: dict[str, Any] = {"prompt_index": prompt_index, "seed": seed}
    if metrics is not None:
        rec.update(metrics)
    rec.update(
        {
            "wall_s": run["wall_s"],
            "denoising_s": run["denoising_s"],
            "decoding_s": run["decoding_s"],
            "text_encoder_s": encode_s,
            "density": stats.get("density"),
            "density_by_kind": stats.get("density_by_kind"),
            "attention_flops_ratio": stats.get("attention_flops_ratio"),
            "dense_steps": stats.get("dense_steps"),
            "drift": stats.get("drift") if metrics is not None else None,
        }
    )
    return rec


def _chunks(settings, grid) -> dict:
    cfg = settings.vmoba_config(grid)
    return {
        "temporal_chunk": cfg.temporal_chunk,
        "spatial_chunk": list(cfg.spatial_chunk),
        "st_chunk": list(cfg.st_chunk),
    }


def _save_video(args, frames, spec, name: str) -> None:
    if not args.videos:
        return
    from worker.video import encode_mp4

    path = Path(args.videos) / f"{name}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_mp4(frames, path, fps=spec.defaults.fps)


def _slug(device: str, model: str) -> str:
    import torch

    dev = gpu_slug() if torch.device(device).type == "cuda" else "cpu"
    return f"{dev}-{re.sub(r'[^a-z0-9.]+', '-', model.lower())}"


def _display_path(path: Path) -> str:
    from bench.common import REPO_ROOT

    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not math.isfinite(value):
        return INF
    return format(value, spec)


def table(record: dict) -> str:
    """The printed summary: one line per setting (means over the prompts)."""
    cols = ("density", "PSNR dB", "SSIM", "rel L2", "mass", "time s", "speedup")
    widths = (7, 8, 6, 7, 6, 8, 8)
    head = f"{'setting':<44} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    lines = [head, "-" * len(head)]
    if record.get("collect_drift"):
        lines.insert(0, "(VMoBA times include the drift measurement; --no-drift for plain times)")
    for r in record["results"]:
        s = r["summary"]
        density = 1.0 if r["name"] == "dense" else s["density"]
        speedup = _fmt(s["speedup"], ".2f") + "x" if s["speedup"] else "-"
        cells = (
            _fmt(density, ".3f"),
            _fmt(s["psnr"], ".2f"),
            _fmt(s["ssim"], ".3f"),
            _fmt(s["rel_l2"], ".3f"),
            _fmt(s["mass_kept"], ".3f"),
            _fmt(s["wall_s"], ".2f"),
            speedup,
        )
        lines.append(
            f"{r['name'][:44]:<44} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
        )
    return "\n".join(lines)


# -- contact sheet ----------------------------------------------------------------------------------


def contact_sheet(
    sheets, path: Path, *, frames_per_row: int = SHEET_FRAMES, frame_width: int = SHEET_WIDTH
):
    """A PNG: per prompt a header, then one labelled row per run (dense first), the same
    `frames_per_row` evenly spaced frames in each row, scaled to `frame_width` pixels wide.

    `sheets`: `[(prompt, seed, [(label, frames uint8 [F, H, W, 3], metrics or None), ...]), ...]`.
    """
    from PIL import Image, ImageDraw

    font = _font(14)
    pad, band = 6, 22
    first = sheets[0][2][0][1]
    f_count, h, w = first.shape[:3]
    scale = frame_width / w
    tw, th = frame_width, max(1, round(h * scale))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    picks = sorted(
        {round(i * (f_count - 1) / max(1, frames_per_row - 1)) for i in range(frames_per_row)}
    )
    width = pad + len(picks) * (tw + pad)
    row_h = band + th + pad
    height = sum(2 * band + len(rows) * row_h for _, _, rows in sheets) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for prompt, seed, rows in sheets:
        draw.text(
            (pad, y), _clip(f"{prompt} (seed {seed})", width, font, draw), fill="black", font=font
        )
        y += band
        for j, i in enumerate(picks):
            draw.text((pad + j * (tw + pad), y), f"frame {i}", fill="gray", font=font)
        y += band
        for name, frames, metrics in rows:
            text = (
                name
                if metrics is None
                else (
                    f"{name}   PSNR {_fmt(metrics['psnr'], '.2f')} dB   SSIM {metrics['ssim']:.3f}"
                )
            )
            draw.text((pad, y + 3), _clip(text, width, font, draw), fill="black", font=font)
            for j, i in enumerate(picks):
                thumb = Image.fromarray(frames[i]).resize((tw, th), resample)
                sheet.paste(thumb, (pad + j * (tw + pad), y + band))
            y += row_h
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path}", file=sys.stderr)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _clip(text: str, width: int, font, draw) -> str:
    while len(text) > 4 and draw.textlength(text, font=font) > width - 12:
        text = text[:-4] + "..."
    return text


# -- command line -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="the synthetic-input comparison (VMoBA against tile-level top-k) instead of videos",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if there is one)")
    p.add_argument("--out", help="JSON path (default bench/results/quality-<device>-<model>.json)")
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the first prompt (prompt i uses seed + i); synthetic: input seed",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    v = p.add_argument_group("videos")
    v.add_argument("--model", default="tiny-wan2.1-t2v", help="a registry model id (a t2v model)")
    v.add_argument(
        "--weights",
        help="a checkpoint (local diffusers folder or hub id) with --model's architecture",
    )
    v.add_argument(
        "--vmoba-trained", action="store_true", help="the weights were fine-tuned with VMoBA"
    )
    v.add_argument("--frames", type=int, help="frames (4k+1; default: the model's)")
    v.add_argument("--height", type=int, help="height (default: the model's)")
    v.add_argument("--width", type=int, help="width (default: the model's)")
    v.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    v.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    v.add_argument("--prompts", help="a file with one prompt per line (# comments)")
    v.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    v.add_argument(
        "--setting",
        type=parse_setting,
        action="append",
        default=[],
        help="a VMoBA setting as a JSON attention object (repeatable)",
    )
    v.add_argument("--kernel", default="auto", choices=("auto", "triton", "reference"))
    v.add_argument(
        "--dtype", default=None, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32"
    )
    v.add_argument("--model-seed", type=int, default=0, help="seed of random or tiny weights")
    v.add_argument(
        "--no-drift",
        dest="drift",
        action="store_false",
        help="skip the attention-level drift (then the times are the plain VMoBA ones)",
    )
    v.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first one untimed step per setting at the video's size (default: on)",
    )
    v.add_argument("--sheet", help="contact sheet PNG (default: the JSON path with .png)")
    v.add_argument(
        "--sheet-frames", type=int, default=SHEET_FRAMES, help="frames per row of the sheet"
    )
    v.add_argument(
        "--sheet-width", type=int, default=SHEET_WIDTH, help="pixels per frame in the sheet"
    )
    v.add_argument("--videos", help="also write every video as an mp4 into this folder")
    from bench.quality_synthetic import add_arguments

    add_arguments(p.add_argument_group("synthetic (--synthetic)"))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.synthetic:
        from bench.quality_synthetic import run_synthetic

        run_synthetic(args)
    else:
        run_videos(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
