"""Backward tuning sweep: the time of each backward kernel (`torch.profiler`, CUDA time) for
candidate configs (`VMOBA_BWD_CONFIG`), at a Wan preset, per layer kind, top-k at ~25%.

Variants (`--variants`): `default` (today's config, the baseline of the run), `split` (dK/dV and
dq kernels; pairs, each kernel's time read on its own, so pairs cover both sweeps at once),
`fused` (the dK/dV kernel makes dQ too; its tiles). `best-bwd-config.json`: the fastest of the
measured variants as a `VMOBA_BWD_CONFIG` value.

    python -m bench.tune_backward [--preset wan1.3b-576p-93f] [--out DIR]
        [--variants default split fused] [--candidates '[{"fused_dq": true, ...}]']
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

import torch

from bench.common import (
    HEAD_DIM,
    HEADS,
    PRESETS,
    RESULTS_DIR,
    bwd_config,
    bwd_label,
    environment,
    gpu_slug,
    topk_for_density,
    write_json,
)
from vmoba import VMoBAConfig, num_blocks
from vmoba.config import LAYER_KINDS
from vmoba.inputs import locality_qkv
from vmoba.kernels.attention import attend
from vmoba.kernels.backward import attend_backward
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

# (dkdv, dq) pairs
SPLIT_PAIRS = [
    (
        {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 2},
    ),
    (
        {"BM": 32, "BN": 128, "num_warps": 8, "num_stages": 2},
        {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2, "ctas_per_sm": 1},
    ),
    (
        {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2, "ctas_per_sm": 2},
    ),
    (
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
        {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2, "ctas_per_sm": 1},
    ),
    (
        {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2},
        {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3, "ctas_per_sm": 1},
    ),
    (
        {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2, "ctas_per_sm": 3},
    ),
]
# (BM, BN, num_warps, num_stages) of the fused dK/dV(+dQ) kernel: smaller BN means more dQ atomics
FUSED_TILES = [
    (64, 128, 8, 2),
    (64, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
]
VARIANTS = {
    "default": [{}],
    "split": [{"fused_dq": False, "dkdv": kv, "dq": q} for kv, q in SPLIT_PAIRS],
    "fused": [
        {"fused_dq": True, "dkdv": dict(BM=bm, BN=bn, num_warps=w, num_stages=st)}
        for bm, bn, w, st in FUSED_TILES
    ],
}
# profiler kernel names -> record keys
KERNELS = {"dkdv": "dkdv", "dq_kernel": "dq", "delta": "delta"}


def kernel_ms(fn, reps: int = 5) -> dict:
    """CUDA time per call of each kernel `fn` launches, by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA":
            out[evt.key] = evt.device_time_total / 1000 / reps
    return out


def best_config(records) -> dict:
    """The fastest measured backward as a `VMOBA_BWD_CONFIG` value: per variant the fastest dK/dV
    tiles and (split) the fastest dq tiles, summed over the layer kinds; then the faster variant."""

    def total(fused: bool, part: str, cfg: dict) -> float:
        runs = [r for r in records if r["config"]["fused_dq"] == fused and r["config"][part] == cfg]
        return sum(r["kernel_ms"][part] for r in runs) / len(runs) * len(LAYER_KINDS)

    best: dict = {}
    for fused in (False, True):
        parts = ("dkdv",) if fused else ("dkdv", "dq")
        cands = [r["config"] for r in records if r["config"]["fused_dq"] == fused]
        if not cands:
            continue
        pick = {p: min((c[p] for c in cands), key=lambda c: total(fused, p, c)) for p in parts}
        ms = sum(total(fused, p, c) for p, c in pick.items())
        best[fused] = (ms, {"fused_dq": fused, **pick})
    if not best:
        raise ValueError("no backward config was measured")
    return min(best.values(), key=lambda x: x[0])[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan1.3b-576p-93f")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["default", "split", "fused"]
    )
    ap.add_argument(
        "--candidates",
        type=json.loads,
        default=None,
        help="JSON list of VMOBA_BWD_CONFIG values, measured after the variants' candidates",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.tune_backward needs a CUDA GPU")
    env = environment()
    grid = PRESETS[args.preset]
    torch.manual_seed(0)
    q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    scale = 1 / math.sqrt(HEAD_DIM)
    paper = VMoBAConfig.for_grid(grid)
    candidates = [c for name in args.variants for c in VARIANTS[name]] + (args.candidates or [])
    records = []
    for kind in LAYER_KINDS:
        kk = topk_for_density(0.25, num_blocks(grid, kind, paper))
        cfg = paper.replace(select="topk", topk=(kk, kk, kk))
        layout = block_layout(grid, kind, cfg, device="cuda")
        sel = select_bits(q, k, layout, cfg, kind)
        lse = torch.empty(HEADS, q.shape[1], device="cuda", dtype=torch.float32)
        out = attend(q, k, v, sel, scale, lse=lse)
        for override in candidates:
            try:
                with bwd_config(override) as bwd:
                    times = kernel_ms(
                        lambda: attend_backward(grad_out, q, k, v, out, lse, sel, scale)  # noqa: B023
                    )
            except Exception:
                traceback.print_exc()
                continue
            pick = {
                field: sum(t for key, t in times.items() if name in key)
                for name, field in KERNELS.items()
            }
            rec = dict(
                gpu=env["gpu"],
                commit=env["commit"],
                preset=args.preset,
                layer_kind=kind,
                select=f"topk{kk}",
                config=bwd,
                kernel_ms=pick,
                backward_kernels_ms=sum(pick.values()),
                total_cuda_ms=sum(times.values()),
            )
            records.append(rec)
            print(
                f"{kind} [{bwd_label(bwd)}] dkdv {pick['dkdv']:.2f} ms | dq {pick['dq']:.2f} ms "
                f"| dkdv+dq+delta {rec['backward_kernels_ms']:.2f} ms "
                f"| all {rec['total_cuda_ms']:.2f} ms",
                flush=True,
            )
        write_json(
            Path(args.out) / f"tuning-backward-{gpu_slug()}.json",
            {"environment": env, "records": records},
        )
    best = best_config(records)
    print("best:", json.dumps(best), flush=True)
    (Path(args.out) / "best-bwd-config.json").write_text(json.dumps(best))


if __name__ == "__main__":
    main()
