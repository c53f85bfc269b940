"""Training-step benchmark: one optimizer step of the Wan 2.1 T2V 1.3B transformer (random
weights, real shapes) with dense attention (SDPA cuDNN) against VMoBA, in one process.

A step as a user fine-tunes: bf16 weights (diffusers' fp32 modules kept), AdamW, activation
checkpointing on every block (`vmoba.diffusers.enable_gradient_checkpointing`), one video
latent (batch 1), a random 512-token text context, flow-matching MSE against a random target:
`zero_grad`, forward, `backward`, `step`. VMoBA runs on every self-attention layer (no dense
steps in training), `threshold_global` 0.25 and top-k at ~25% density per layer kind.
`step_ms`: median of `--steps` timed steps (CUDA events) after `--warmup` steps (which compile
the kernels); `peak_mem_gib`: the peak allocation of the timed steps.

    python -m bench.train_step [--presets wan1.3b-576p-93f ...] [--steps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import PRESETS, RESULTS_DIR, environment, gpu_slug, topk_for_density, write_json
from vmoba import VMoBAConfig, num_blocks
from vmoba.config import LAYER_KINDS, AttentionSettings

TEXT_TOKENS = 512


def batch(grid, config: dict, device="cuda"):
    """Latent `[1, C, T, 2*Hg, 2*Wg]` (patch 1x2x2 gives the token grid), timestep, text, target."""
    t, hg, wg = grid
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, config["in_channels"], t, 2 * hg, 2 * wg)
    latent = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    target = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    text = torch.randn(
        1, TEXT_TOKENS, config["text_dim"], generator=gen, device=device, dtype=torch.bfloat16
    )
    timestep = torch.tensor([500.0], device=device)
    return latent, timestep, text, target


def timed_steps(model, optimizer, inputs, warmup: int, steps: int, context) -> dict:
    latent, timestep, text, target = inputs

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context():
            out = model(
                hidden_states=latent,
                timestep=timestep,
                encoder_hidden_states=text,
                return_dict=False,
            )[0]
            loss = F.mse_loss(out.float(), target.float())
            loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        losses.append(float(loss.detach()))
    return dict(
        step_ms=statistics.median(times),
        step_ms_all=times,
        loss=losses,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
    )


def vmoba_settings(grid) -> dict:
    paper = VMoBAConfig.for_grid(grid)
    topk = tuple(topk_for_density(0.25, num_blocks(grid, kind, paper)) for kind in LAYER_KINDS)
    common = dict(backend="vmoba", dense_steps=0.0, collect_density=False)
    return {
        "threshold_global0.25": AttentionSettings(
            select="threshold_global", threshold=0.25, **common
        ),
        "topk" + "-".join(map(str, topk)): AttentionSettings(select="topk", topk=topk, **common),
    }


def run_preset(name, model, config, env, records, args, path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vmoba.diffusers import install_vmoba

    grid = PRESETS[name]
    inputs = batch(grid, config)
    base = dict(
        gpu=env["gpu"],
        commit=env["commit"],
        preset=name,
        tokens=grid[0] * grid[1] * grid[2],
        grid=list(grid),
        model="wan2.1-t2v-1.3b-random",
        dtype="bf16",
        optimizer="AdamW",
        checkpointing=True,
        batch=1,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dense = None
    try:
        res = timed_steps(
            model,
            optimizer,
            inputs,
            args.warmup,
            args.steps,
            lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
        )
        dense = res["step_ms"]
        records.append({**base, "attention": "dense_cudnn", **res})
        print(
            f"{name} dense (cuDNN): {dense:.0f} ms, peak {res['peak_mem_gib']:.1f} GiB", flush=True
        )
    except Exception:
        traceback.print_exc()
    write_json(path, {"environment": env, "records": records})
    for label, settings in vmoba_settings(grid).items():
        handle = install_vmoba(model, settings)
        try:
            res = timed_steps(model, optimizer, inputs, args.warmup, args.steps, nullcontext)
        except Exception:
            traceback.print_exc()
            continue
        finally:
            handle.remove()
        rec = {**base, "attention": f"vmoba_{label}", **res}
        if dense:
            rec["speedup_vs_dense"] = dense / res["step_ms"]
        records.append(rec)
        print(
            f"{name} vmoba {label}: {res['step_ms']:.0f} ms x{rec.get('speedup_vs_dense', 0):.2f}, "
            f"peak {res['peak_mem_gib']:.1f} GiB",
            flush=True,
        )
        write_json(path, {"environment": env, "records": records})
    del optimizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=["wan1.3b-576p-93f", "wan1.3b-720p-81f"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.train_step needs a CUDA GPU")
    from vmoba.diffusers import enable_gradient_checkpointing
    from worker.random_model import WAN21_T2V_1_3B, build_random_transformer

    env = environment()
    print(env, flush=True)
    model = build_random_transformer(WAN21_T2V_1_3B)
    model.train().requires_grad_(True)
    enable_gradient_checkpointing(model)
    records: list = []
    path = Path(args.out) / f"train-step-{gpu_slug()}.json"
    for name in args.presets:
        run_preset(name, model, WAN21_T2V_1_3B, env, records, args, path)


if __name__ == "__main__":
    main()
