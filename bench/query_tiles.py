"""How much work a backward would add by walking contiguous query tiles instead of the gathered
queries that selected a key block (a design question for the dK/dV kernel, which gathers its
query rows and so cannot load them by TMA).

For each layer kind and selection at a preset's grid, with the benchmarks' seeded locality
inputs and the reference selection on the CPU: the query tiles of `BM` consecutive queries that
hold at least one query selecting a block, times `BM`, over the (query, block) pairs selected.
1.0 would cost nothing; 2.0 doubles the dK/dV work. Queries in raster order (the sequence as it
is) and in the kind's blocked order (queries grouped by their own block, as the keys are).

    python -m bench.query_tiles [--preset wan1.3b-576p-93f] [--heads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import PRESETS, RESULTS_DIR, environment, topk_for_density, write_json
from vmoba import VMoBAConfig, num_blocks
from vmoba.config import LAYER_KINDS
from vmoba.inputs import locality_qkv
from vmoba.partition import block_layout
from vmoba.select import select_blocks


def inflation(selected: torch.Tensor, tile: int) -> float:
    """`selected [H, S, C]` bool -> tiles holding a selecting query x `tile` / selected pairs."""
    h, s, c = selected.shape
    usable = s - s % tile
    tiles = selected[:, :usable].reshape(h, usable // tile, tile, c).any(dim=2)
    return tiles.sum().item() * tile / selected[:, :usable].sum().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan1.3b-576p-93f", choices=sorted(PRESETS))
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)

    grid = PRESETS[args.preset]
    gen = torch.Generator().manual_seed(0)
    q, k, _ = locality_qkv(grid, 1, args.heads, args.head_dim, generator=gen)
    paper = VMoBAConfig.for_grid(grid)
    records = []
    for kind in LAYER_KINDS:
        kk = topk_for_density(0.25, num_blocks(grid, kind, paper))
        for label, cfg in (
            ("threshold_global0.25", paper.replace(select="threshold_global", threshold=0.25)),
            (f"topk{kk}", paper.replace(select="topk", topk=(kk, kk, kk))),
        ):
            layer = next(i for i in range(len(cfg.layer_kinds)) if cfg.kind(i) == kind)
            sel = select_blocks(q, k, grid=grid, layer_idx=layer, config=cfg, kernel="reference")[0]
            blocked = sel[:, block_layout(grid, kind, cfg).perm.long()]
            for tile in args.tiles:
                rec = {
                    "preset": args.preset,
                    "grid": list(grid),
                    "layer_kind": kind,
                    "select": label,
                    "density": sel.float().mean().item(),
                    "query_tile": tile,
                    "inflation_raster_order": inflation(sel, tile),
                    "inflation_blocked_order": inflation(blocked, tile),
                }
                records.append(rec)
                print(
                    f"{kind} {label:22s} tile {tile:3d}: density {rec['density']:.3f}, "
                    f"raster {rec['inflation_raster_order']:.2f}x, "
                    f"blocked {rec['inflation_blocked_order']:.2f}x",
                    flush=True,
                )
    env = environment("cpu")
    write_json(
        args.out / "query-tiles-cpu.json",
        {
            "environment": env,
            "heads": args.heads,
            "inputs": "locality_qkv seed 0",
            "records": records,
        },
    )


if __name__ == "__main__":
    main()
