"""Context parallelism (Ulysses) benchmark: one Wan transformer step on 1 GPU against N GPUs.

What runs, in one command (`mp.spawn`: one process per GPU, NCCL; the 1-GPU baseline in a
process of its own first, on the first GPU of the same machine):
- the Wan 2.1 T2V 1.3B transformer (real config, random weights, bf16; `bench.pipeline`'s
  builder, the same seed on every rank) at 720x1280x81: grid (21, 45, 80) = 75,600 tokens;
- `bench.pipeline`'s denoising step: classifier-free guidance (two transformer calls), the UniPC
  scheduler step, random text embeddings `[1, 512, 4096]`;
- two attention modes through the worker's own path (`install_vmoba`, and with N > 1
  `vmoba.diffusers.parallel.enable_ulysses`): `dense` (diffusers' attention dispatch, SDPA with
  cuDNN first; its Ulysses all-to-all with N > 1) and `vmoba` with the defaults of
  `vmoba.defaults.recommended_settings` for stock weights (top-k (2, 10, 9) at this grid,
  Triton kernels), every measured step sparse.

Measured per mode and GPU count: step time (CUDA events on rank 0, median of the measured steps
after warm-up steps), the time spent in collectives inside those steps (CUDA events around each
all-to-all and the output all-gather: VMoBA's exchange with its layout copies, diffusers'
all-to-alls of the dense and cross-attention, the gather after `proj_out`), peak GPU memory, and
the latents after the run's steps. Compared: speed-up `step(1) / step(N)` against the issue's
targets (2 GPUs >= 1.8x, 4 GPUs >= 3.3x), and the N-GPU latents against the 1-GPU ones
(relative L2 and max abs difference; bf16 tolerance `LATENT_REL_L2_TOL`).

    python -m bench.context_parallel --gpus 2                # appends to context-parallel-<gpu>.json
    python -m bench.context_parallel --gpus 2 4              # one 1-GPU baseline, then 2 and 4
    python -m bench.context_parallel --gpus 2 --device cpu --tiny --steps 1 2   # CPU dry run (gloo)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, run from anywhere
from bench.common import RESULTS_DIR, environment, gpu_slug, wan_transformer_config

PRESET = "wan1.3b-720p-81f"
# N-GPU latents after the run's steps against the 1-GPU ones: bf16 carries 8 significant bits,
# and a split sequence changes the shapes (so the reduction order) of every matrix product.
LATENT_REL_L2_TOL = 2e-2
TARGETS = {2: 1.8, 4: 3.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[2], help="N: GPUs of each parallel run")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny test model (CPU dry run)")
    p.add_argument("--layers", type=int, default=None, help="fewer transformer layers")
    p.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=(1, 2),
        metavar=("WARMUP", "MEASURED"),
        help="per mode",
    )
    p.add_argument("--modes", nargs="+", default=["dense", "vmoba"], choices=("dense", "vmoba"))
    p.add_argument("--out", type=Path, default=None, help="JSON file to append the record to")
    return p.parse_args(argv)


def preset(args) -> dict:
    from bench.pipeline import PRESETS

    return PRESETS["tiny-17f-64" if args.tiny else PRESET]


class Collectives:
    """CUDA events (or host times) around each collective the step makes, by label."""

    def __init__(self, clock):
        self.clock = clock
        self.marks: list = []  # (label, start, end)
        self.on = False

    def wrap(self, label, fn):
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            start = self.clock.mark()
            out = fn(*a, **kw)
            self.marks.append((label, start, self.clock.mark()))
            return out

        return timed

    def install(self):
        """Patch the collectives of this process's step (module attributes looked up at call
        time): VMoBA's exchange, diffusers' Ulysses all-to-all and its output gather."""
        import diffusers.hooks.context_parallel as cp_hooks
        import diffusers.models.attention_dispatch as dispatch

        from vmoba import parallel

        for name in ("heads_from_sequence", "sequence_from_heads"):
            setattr(parallel, name, self.wrap(f"vmoba {name}", getattr(parallel, name)))
        dispatch._all_to_all_single = self.wrap(
            "diffusers all_to_all (dense self-attention)", dispatch._all_to_all_single
        )
        sharder = cp_hooks.EquipartitionSharder
        unshard = sharder.unshard.__func__
        sharder.unshard = classmethod(self.wrap("output all_gather", unshard))

    def per_step(self, steps: int) -> dict:
        self.clock.sync()
        out: dict[str, float] = {}
        for label, start, end in self.marks:
            out[label] = out.get(label, 0.0) + self.clock.ms(start, end) / steps
        self.marks = []
        return out


def run_rank(rank: int, world: int, args, port: int, workdir: str) -> None:
    import torch

    from bench.pipeline import (
        TEXT_TOKENS,
        Clock,
        build_transformer,
        make_latents,
        make_scheduler,
        sdpa_context,
    )
    from vmoba.defaults import recommended_settings
    from vmoba.diffusers import AttentionSettings, install_vmoba

    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=store, rank=rank, world_size=world
        )
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = wan_transformer_config(tiny=args.tiny, num_layers=args.layers)
    p = preset(args)
    latent_grid = (1 + (p["frames"] - 1) // 4, p["height"] // 8, p["width"] // 8)
    pt, ph, pw = config["patch_size"]
    grid = (latent_grid[0] // pt, latent_grid[1] // ph, latent_grid[2] // pw)

    transformer = build_transformer(config, device, dtype)
    latents = make_latents(config["in_channels"], latent_grid, device, "noise")
    gen = torch.Generator().manual_seed(2)
    text_shape = (1, TEXT_TOKENS, config["text_dim"])
    cond = torch.randn(text_shape, generator=gen).to(device, dtype)
    uncond = torch.randn(text_shape, generator=gen).to(device, dtype)
    scheduler = make_scheduler(p["flow_shift"])
    clock = Clock(device)
    handle = install_vmoba(transformer, AttentionSettings(backend="dense"), scheduler=scheduler)
    collectives = Collectives(clock)
    if world > 1:
        from vmoba.diffusers.parallel import enable_ulysses

        enable_ulysses([transformer])
        collectives.install()
    _, sdpa = sdpa_context(
        device, config["num_attention_heads"], config["attention_head_dim"], dtype
    )
    defaults = recommended_settings(grid, vmoba_trained=False)
    settings = {
        "dense": AttentionSettings(backend="dense", collect_density=False),
        "vmoba": AttentionSettings.from_dict(
            {**defaults, "dense_steps": 0.0, "collect_density": False}
        ),
    }
    warmup, measured = args.steps
    records = {}
    with torch.inference_mode(), sdpa():
        for mode in args.modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            scheduler.set_timesteps(50, device=device)
            scheduler.set_begin_index(0)
            x = latents.clone()
            times, comm = [], {}
            with handle.use(settings[mode]):
                for i, t in enumerate(scheduler.timesteps[: warmup + measured]):
                    collectives.on = i >= warmup
                    start = clock.mark()
                    x = _step(transformer, scheduler, x, t, cond, uncond)
                    end = clock.mark()
                    if i >= warmup:
                        times.append((start, end))
                collectives.on = False
            clock.sync()
            if world > 1:
                comm = collectives.per_step(measured)
            step_ms = [clock.ms(a, b) for a, b in times]
            records[mode] = {
                "settings": settings[mode].to_dict(),
                "step_ms": statistics.median(step_ms),
                "step_ms_all": step_ms,
                "collectives_ms_per_step": comm,
                "collectives_ms_total_per_step": sum(comm.values()),
                "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
            if rank == 0:
                torch.save(x.float().cpu(), Path(workdir) / f"latents-{mode}-{world}.pt")
            print(
                f"[N={world} rank {rank}] {mode}: {records[mode]['step_ms']:.1f} ms/step",
                flush=True,
            )
    if rank == 0:
        (Path(workdir) / f"record-{world}.json").write_text(
            json.dumps({"grid": list(grid), "modes": records})
        )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _step(transformer, scheduler, latents, t, cond, uncond):
    """`bench.pipeline.Steps._step`: both CFG calls, the guidance mix, the scheduler step."""
    from bench.pipeline import GUIDANCE

    x = latents.to(transformer.patch_embedding.weight.dtype)
    timestep = t.expand(latents.shape[0])
    c = transformer(
        hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False
    )[0]
    u = transformer(
        hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False
    )[0]
    return scheduler.step(u + GUIDANCE * (c - u), t, latents, return_dict=False)[0]


def compare(a, b) -> dict:
    diff = (a - b).double()
    return {
        "rel_l2": float(diff.norm() / a.double().norm()),
        "max_abs": float(diff.abs().max()),
        "ref_max_abs": float(a.abs().max()),
    }


def main(argv=None) -> int:
    import torch
    import torch.multiprocessing as mp

    from service.serve import free_port

    args = parse_args(argv)
    most = max(args.gpus)
    if args.device == "cuda" and torch.cuda.device_count() < most:
        raise SystemExit(f"--gpus {most} but {torch.cuda.device_count()} GPU(s) visible")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (KINDS.md)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    workdir = tempfile.mkdtemp(prefix="cp-bench-")
    t0 = time.time()
    runs = {}
    for world in (1, *args.gpus):
        try:
            mp.spawn(run_rank, args=(world, args, free_port(), workdir), nprocs=world, join=True)
        except Exception as exc:  # keep the other runs; say what failed
            print(f"N={world} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        runs[world] = json.loads((Path(workdir) / f"record-{world}.json").read_text())
        print(f"RECORD N={world} {json.dumps(runs[world])}", flush=True)
    if 1 not in runs:
        raise SystemExit("the 1-GPU baseline failed: nothing to compare")
    env = environment(args.device)
    out = args.out or RESULTS_DIR / f"context-parallel-{gpu_slug(env['gpu'])}.json"
    records = json.loads(out.read_text()) if out.exists() else []
    for n in args.gpus:
        if n in runs:
            records.append(make_record(args, n, runs, workdir, env, time.time() - t0))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def make_record(args, n: int, runs: dict, workdir: str, env: dict, wall_s: float) -> dict:
    """The record of N GPUs against the 1-GPU run of the same command."""
    import torch

    p = preset(args)
    grid = runs[1]["grid"]
    record = dict(
        env,
        bench="context_parallel",
        preset="tiny-17f-64" if args.tiny else PRESET,
        resolution=f"{p['height']}x{p['width']}",
        frames=p["frames"],
        grid=grid,
        tokens=math.prod(grid),
        model="tiny random Wan" if args.tiny else "Wan2.1-T2V-1.3B architecture, random weights",
        dtype="fp32" if args.tiny else "bf16",
        gpus=n,
        parallelism="Ulysses (vmoba.diffusers.parallel.enable_ulysses), NCCL"
        if args.device == "cuda"
        else "Ulysses, gloo (CPU)",
        cfg=True,
        warmup_steps=args.steps[0],
        measured_steps=args.steps[1],
        latent_rel_l2_tolerance=LATENT_REL_L2_TOL,
        target_speedup=TARGETS.get(n),
        method=(
            "one process per GPU (mp.spawn); a step = both CFG transformer calls + the UniPC step; "
            "step_ms: CUDA events on rank 0, median over the measured steps; collectives: CUDA "
            "events around each collective within the measured steps (the wait for the slowest "
            "rank included), per step; latents: after warm-up + measured steps from the same "
            "noise, N GPUs against 1"
        ),
        modes={},
        wall_s_whole_command=round(wall_s, 1),
        baseline="the 1-GPU run of the same command, on the first GPU of the same machine",
    )
    for mode in args.modes:
        one, many = runs[1]["modes"][mode], runs[n]["modes"][mode]
        a = torch.load(Path(workdir) / f"latents-{mode}-1.pt")
        b = torch.load(Path(workdir) / f"latents-{mode}-{n}.pt")
        speedup = one["step_ms"] / many["step_ms"]
        latents = compare(a, b)
        comm = many["collectives_ms_total_per_step"]
        record["modes"][mode] = {
            "settings": one["settings"],
            "step_ms_1gpu": one["step_ms"],
            f"step_ms_{n}gpu": many["step_ms"],
            "step_ms_all_1gpu": one["step_ms_all"],
            f"step_ms_all_{n}gpu": many["step_ms_all"],
            "speedup": speedup,
            "target_met": speedup >= TARGETS[n] if n in TARGETS else None,
            "ideal_step_ms": one["step_ms"] / n,
            f"collectives_ms_per_step_{n}gpu": many["collectives_ms_per_step"],
            "collectives_share": comm / many["step_ms"],
            "compute_ms_per_step": many["step_ms"] - comm,
            "compute_speedup": one["step_ms"] / (many["step_ms"] - comm),
            "peak_gpu_memory_gib_1gpu": one["peak_gpu_memory_gib"],
            f"peak_gpu_memory_gib_{n}gpu": many["peak_gpu_memory_gib"],
            "latents": {**latents, "within_tolerance": latents["rel_l2"] <= LATENT_REL_L2_TOL},
        }
        print(
            f"{mode}: 1 GPU {one['step_ms']:.1f} ms, {n} GPUs {many['step_ms']:.1f} ms "
            f"-> {speedup:.2f}x (collectives {comm:.1f} ms/step); latents rel L2 "
            f"{latents['rel_l2']:.2e}",
            flush=True,
        )
    return record


if __name__ == "__main__":
    sys.exit(main())
