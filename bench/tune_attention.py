"""Time the attention alone (selection done once) for several kernel configs and cases.

python -m bench.tune_attention [--cases wan1.3b-720p-81f:2d:0.25 ...] [--candidates JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from bench.common import HEAD_DIM, HEADS, PRESETS, median_ms, topk_for_density
from vmoba import VMoBAConfig, num_blocks
from vmoba.inputs import locality_qkv
from vmoba.kernels.attention import attend
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

CANDIDATES = [
    {},
    {"BN": 64, "num_stages": 2, "ctas_per_sm": 2, "maxnreg": 128},
    {"BN": 64, "num_stages": 3, "ctas_per_sm": 2, "maxnreg": 128},
    {"BM": 64, "BN": 128, "num_stages": 2, "num_warps": 4, "ctas_per_sm": 2},
    {"BM": 64, "BN": 64, "num_stages": 3, "num_warps": 4, "ctas_per_sm": 2},
    {"BN": 64, "num_stages": 3},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cases",
        nargs="*",
        default=["wan1.3b-720p-81f:2d:0.25", "wan1.3b-720p-81f:2d:0.1", "wan1.3b-480p-81f:3d:0.25"],
        help="preset:kind:density",
    )
    ap.add_argument("--candidates", default=None, help="JSON list of configs (default: CANDIDATES)")
    args = ap.parse_args()
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    scale = 1 / math.sqrt(HEAD_DIM)
    for case in args.cases:
        preset, kind, density = case.split(":")
        grid = PRESETS[preset]
        q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        paper = VMoBAConfig.for_grid(grid)
        kk = topk_for_density(float(density), num_blocks(grid, kind, paper))
        cfg = paper.replace(select="topk", topk=(kk, kk, kk))
        layout = block_layout(grid, kind, cfg, device="cuda")
        sel = select_bits(q, k, layout, cfg, kind)
        flops = float(sel.density()) * 4 * q.shape[1] ** 2 * HEADS * HEAD_DIM
        for cand in candidates:
            os.environ["VMOBA_ATTN_CONFIG"] = json.dumps(cand)
            try:
                # this case's tensors bound now (the loop rebinds them, and `del`s them at its end)
                ms = median_ms(
                    lambda q=q, k=k, v=v, sel=sel: attend(q, k, v, sel, scale), rep_ms=400
                )
                print(
                    f"{case:28s} {json.dumps(cand):70s} {ms:7.2f} ms {flops / ms / 1e9:4.0f} TFLOP/s",
                    flush=True,
                )
            except Exception as exc:
                print(f"{case:28s} {json.dumps(cand):70s} failed {exc!r}"[:300], flush=True)
        del q, k, v, sel


if __name__ == "__main__":
    main()
