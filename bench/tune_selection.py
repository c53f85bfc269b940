"""Time `select_bits` (pooling, gate, selection) for several gate-kernel configs.

python -m bench.tune_selection [--preset wan1.3b-720p-81f]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.common import HEAD_DIM, HEADS, PRESETS, median_ms, topk_for_density
from vmoba import VMoBAConfig, num_blocks
from vmoba.inputs import locality_qkv
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

CANDIDATES = [
    {},
    {"BM": 128, "num_warps": 8},
    {"BM": 64, "num_warps": 8},
    {"BM": 32, "num_warps": 4},
    {"BM": 128, "num_warps": 4},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan1.3b-720p-81f")
    ap.add_argument("--candidates", default=None, help="JSON list of configs (default: CANDIDATES)")
    args = ap.parse_args()
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    grid = PRESETS[args.preset]
    q, k, _ = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    paper = VMoBAConfig.for_grid(grid)
    cases = []
    for kind in ("2d", "3d"):
        c = num_blocks(grid, kind, paper)
        for density in (0.25, 0.1):
            kk = topk_for_density(density, c)
            cases.append(
                (f"{kind} topk{kk}/{c}", paper.replace(select="topk", topk=(kk, kk, kk)), kind)
            )
        cases.append((f"{kind} threshold_global", paper.replace(select="threshold_global"), kind))
    for cand in candidates:
        # {"pool": {...}} goes to the pooling kernel, the rest to the gate kernels
        os.environ["VMOBA_POOL_CONFIG"] = json.dumps(cand.get("pool", {}))
        os.environ["VMOBA_GATE_CONFIG"] = json.dumps(
            {key: val for key, val in cand.items() if key != "pool"}
        )
        for label, cfg, kind in cases:
            layout = block_layout(grid, kind, cfg, device="cuda")
            try:
                # this case's layout, config and kind bound now (not looked up when called)
                ms = median_ms(
                    lambda layout=layout, cfg=cfg, kind=kind: select_bits(q, k, layout, cfg, kind),
                    rep_ms=300,
                )
                print(f"{json.dumps(cand):36s} {label:24s} {ms * 1000:8.1f} us", flush=True)
            except Exception as exc:
                print(f"{json.dumps(cand):36s} {label:24s} failed {exc!r}"[:300], flush=True)


if __name__ == "__main__":
    main()
