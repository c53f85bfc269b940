"""Time the attention waves alone (selection done once) for several kernel configs on one case.

    python -m bench.tune_attention [--preset wan1.3b-720p-81f] [--kind 2d] [--density 0.25]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from bench.common import HEAD_DIM, HEADS, PRESETS, median_ms
from vmoba import VMoBAConfig, num_blocks
from vmoba.inputs import locality_qkv
from vmoba.kernels import launch
from vmoba.partition import block_layout

CANDIDATES = [
    {"BN": 128, "num_stages": 3, "num_warps": 8},
    {"BN": 128, "num_stages": 3, "num_warps": 8, "partial_dtype": "float16"},
    {"BN": 128, "num_stages": 4, "num_warps": 8},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan1.3b-720p-81f")
    ap.add_argument("--kind", default="2d")
    ap.add_argument("--density", type=float, default=0.25)
    args = ap.parse_args()
    grid = PRESETS[args.preset]
    q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    paper = VMoBAConfig.for_grid(grid)
    kk = max(1, round(args.density * num_blocks(grid, args.kind, paper)))
    cfg = paper.replace(select="topk", topk=(kk, kk, kk))
    layout = block_layout(grid, args.kind, cfg, device="cuda")
    sel = launch.select_bits(q, k, layout, cfg, args.kind)
    flops = float(sel.density()) * 4 * q.shape[1] ** 2 * HEADS * HEAD_DIM
    scale = 1 / math.sqrt(HEAD_DIM)
    for cand in CANDIDATES:
        os.environ["VMOBA_ATTN_CONFIG"] = json.dumps(cand)
        try:
            ms = median_ms(lambda: launch.attend(q, k, v, sel, scale))
            print(f"{cand}: {ms:.2f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Exception as exc:
            print(f"{cand}: failed {exc!r}"[:300], flush=True)


if __name__ == "__main__":
    main()
