"""Backward tuning sweep: the time of each backward kernel (`torch.profiler`, CUDA time) for
candidate tile configs (`VMOBA_BWD_CONFIG`), at a Wan preset, per layer kind, top-k at ~25%.

    python -m bench.tune_backward [--preset wan1.3b-576p-93f] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

from bench.common import (
    HEAD_DIM,
    HEADS,
    PRESETS,
    RESULTS_DIR,
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

# (dkdv, dq) pairs: each kernel's time is read on its own, so pairs cover both sweeps at once
CANDIDATES = [
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan1.3b-576p-93f")
    ap.add_argument("--out", default=str(RESULTS_DIR))
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
    records = []
    for kind in LAYER_KINDS:
        kk = topk_for_density(0.25, num_blocks(grid, kind, paper))
        cfg = paper.replace(select="topk", topk=(kk, kk, kk))
        layout = block_layout(grid, kind, cfg, device="cuda")
        sel = select_bits(q, k, layout, cfg, kind)
        lse = torch.empty(HEADS, q.shape[1], device="cuda", dtype=torch.float32)
        out = attend(q, k, v, sel, scale, lse=lse)
        for dkdv, dq in CANDIDATES:
            os.environ["VMOBA_BWD_CONFIG"] = json.dumps({"dkdv": dkdv, "dq": dq})
            try:
                times = kernel_ms(
                    lambda: attend_backward(grad_out, q, k, v, out, lse, sel, scale)  # noqa: B023
                )
            except Exception:
                traceback.print_exc()
                continue
            pick = {
                name: sum(t for key, t in times.items() if name in key)
                for name in ("dkdv", "dq_kernel", "delta")
            }
            rec = dict(
                gpu=env["gpu"],
                commit=env["commit"],
                preset=args.preset,
                layer_kind=kind,
                select=f"topk{kk}",
                dkdv=dkdv,
                dq=dq,
                kernel_ms=pick,
                total_cuda_ms=sum(times.values()),
            )
            records.append(rec)
            print(
                f"{kind} dkdv {dkdv} -> {pick['dkdv']:.2f} ms | dq {dq} -> {pick['dq_kernel']:.2f} ms "
                f"| all {rec['total_cuda_ms']:.2f} ms",
                flush=True,
            )
        write_json(
            Path(args.out) / f"tuning-backward-{gpu_slug()}.json",
            {"environment": env, "records": records},
        )
    os.environ.pop("VMOBA_BWD_CONFIG", None)
    best = {
        name: min(
            (c[i] for c in CANDIDATES),
            key=lambda cand: sum(r["kernel_ms"][key] for r in records if r[name] == cand),
        )
        for i, (name, key) in enumerate((("dkdv", "dkdv"), ("dq", "dq_kernel")))
    }
    print("best:", json.dumps(best), flush=True)
    (Path(args.out) / "best-bwd-config.json").write_text(json.dumps(best))


if __name__ == "__main__":
    main()
