"""VMoBA's token-level selection against a tile-level top-k mask of the same density (issue #16).

`python -m bench.quality --synthetic`. On locality-structured inputs (`vmoba.inputs.locality_qkv`:
q and k share a smooth random field over the video grid, v is Gaussian) at the three Wan grids,
for every layer kind (1D, 2D, 3D partition) and every selection mode of VMoBA:

- `topk` with the paper's `k` for the grid (`vmoba.defaults.topk_for_grid`),
- `threshold_query` at `--tau`, and `threshold_global` at `--tau` (default 0.25),

it compares the VMoBA selection with what a tile-sparse kernel (FlexAttention with a block mask,
or any 128 x 128 tile kernel) would run at the same density:

- q and k are cut into `--tile`-token tiles (128), in two orders: `natural` (raster order, the
  sequence as the model holds it: a tile is a strip of about 2.5 latent rows at 480p) and
  `blocked` (VMoBA's permuted order for that layer kind, where each VMoBA block is contiguous, so
  a tile lies inside one block or straddles two neighbours);
- every (query tile, key tile) pair is scored by `mean q . mean k` (the same gate VMoBA uses,
  pooled on both sides); each query tile keeps its own (diagonal) tile plus the best other key
  tiles, the same number `k_tile` for every query tile and head, `k_tile` chosen so that the
  tile mask's token density is nearest the density VMoBA achieved for that kind and mode.

Per method it reports the density, and on `--rows` sampled query rows (`vmoba.drift`, fp32, the
dense softmax shared by all methods): the relative L2 error of the output against dense attention
and the softmax mass kept. The selections are the reference implementation's (exact), in fp32.
`verdicts` lists, per grid, kind and mode, which method has the lowest error; where VMoBA
loses, it says so.

Full size (`--heads 12 --head-dim 128`, the Wan 2.1 1.3B shapes) wants a GPU; on a CPU use
`--heads 2` and/or `--scale 0.5` (the spatial size of the grid; the frames are kept).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from bench.common import HEAD_DIM, HEADS, PRESETS, RESULTS_DIR, environment, gpu_slug, write_json

GRIDS = tuple(PRESETS.values())  # (21, 30, 52), (24, 36, 64), (21, 45, 80)
TILE = 128
ROWS = 512
TAU = 0.25
METHODS = ("vmoba", "tile_natural", "tile_blocked")


def add_arguments(g) -> None:
    g.add_argument("--grids", help="latent grids T,H,W;T,H,W;... (default: the three Wan grids)")
    g.add_argument(
        "--heads", type=int, default=HEADS, help=f"heads (default {HEADS}, Wan 2.1 1.3B)"
    )
    g.add_argument("--head-dim", type=int, default=HEAD_DIM, help=f"head dim (default {HEAD_DIM})")
    g.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="scale the grids' height and width by this (CPU: 0.5); frames are kept",
    )
    g.add_argument("--tau", type=float, default=TAU, help="tau of the threshold modes")
    g.add_argument(
        "--tile", type=int, default=TILE, help="tile size in tokens of the tile baseline"
    )
    g.add_argument("--rows", type=int, default=ROWS, help="query rows sampled for the error")


def parse_grids(text) -> list:
    if not text:
        return list(GRIDS)
    grids = []
    for part in text.split(";"):
        values = tuple(int(x) for x in part.split(","))
        if len(values) != 3 or min(values) < 1:
            raise SystemExit(f"--grids: {part!r} is not T,H,W")
        grids.append(values)
    return grids


def scaled(grid, scale: float) -> tuple:
    t, h, w = grid
    return t, max(1, round(h * scale)), max(1, round(w * scale))


# -- the tile baseline ------------------------------------------------------------------------------


def tile_ids(order: torch.Tensor, tile: int) -> torch.Tensor:
    """Tile of every token (natural index) when the tokens are laid out in `order` (`order[p]` is
    the natural index of the token at position `p`) and cut into `tile`-token tiles."""
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos // tile


def tile_topk(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, target: float) -> dict:
    """Tile-level top-k of the density nearest `target`.

    `q, k [B, S, H, D]`, `ids [S]` tile of each token. Scores `mean q . mean k` per tile pair;
    every query tile keeps its own tile plus its best others, `k_tile` of them in all (the same
    for every query tile and head). Returns `selected [B, H, n, n]` (query tile -> key tiles),
    `k_tile`, `density` (the fraction of the S x S scores the mask computes).
    """
    from vmoba.reference import block_means

    b, s, h, _ = q.shape
    n = int(ids.max()) + 1
    qm, km = block_means(q, ids, n), block_means(k, ids, n)  # [B, n, H, D]
    scores = torch.einsum("bthd,buhd->bhtu", qm, km)
    diag = torch.arange(n, device=q.device)
    scores[..., diag, diag] = math.inf  # own tile first
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, H, n, n]
    lengths = torch.bincount(ids, minlength=n).double()
    # density with the best k tiles per query tile, for every k at once
    cum = torch.cumsum(lengths[order], -1)  # [B, H, n, k]: key tokens of the best k tiles
    dens = (cum * lengths[:, None]).sum((0, 1, 2)) / (b * h * s * s)  # [k]
    k_tile = int(torch.argmin((dens - target).abs())) + 1
    selected = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, order[..., :k_tile], True)
    return {"selected": selected, "k_tile": k_tile, "tiles": n, "density": float(dens[k_tile - 1])}


# -- one grid ---------------------------------------------------------------------------------------


def modes(grid, tau: float) -> list:
    """`(name, VMoBAConfig fields)` of the compared VMoBA selections at `grid`."""
    from vmoba.defaults import topk_for_grid

    return [
        ("topk", {"select": "topk", "topk": topk_for_grid(grid)}),
        ("threshold_query", {"select": "threshold_query", "threshold": tau}),
        ("threshold_global", {"select": "threshold_global", "threshold": tau}),
    ]


def compare_grid(
    grid, *, heads: int, head_dim: int, tau: float, tile: int, rows: int, seed: int, device
) -> dict:
    """Every kind and mode at one grid: VMoBA and both tile baselines (see the module doc)."""
    from vmoba import VMoBAConfig, select_blocks
    from vmoba.drift import Drift, drift_sums, sample_rows
    from vmoba.flops import attended_tokens
    from vmoba.inputs import locality_qkv
    from vmoba.partition import block_layout

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = locality_qkv(
        grid, 1, heads, head_dim, dtype=torch.float32, device=device, generator=gen
    )
    s = math.prod(grid)
    idx = sample_rows(s, rows, device)
    n_vectors = heads * idx.numel()
    natural = tile_ids(torch.arange(s, device=device), tile)
    base = VMoBAConfig.for_grid(grid)
    kinds = {}
    for layer, kind in enumerate(base.layer_kinds):
        layout = block_layout(grid, kind, base, device=device)
        blocked = tile_ids(layout.perm.long(), tile)
        entries, selections = [], []
        for name, fields in modes(grid, tau):
            cfg = VMoBAConfig.for_grid(grid, **fields)
            sel = select_blocks(q, k, grid=grid, layer_idx=layer, config=cfg, kernel="reference")
            rho = float(attended_tokens(sel, layout.lengths).sum()) / (heads * s * s)
            entry = {"mode": name, "param": _param(fields, kind), "vmoba": {"density": rho}}
            selections.append((sel[:, :, idx], layout.ids))
            del sel
            for method, ids in (("tile_natural", natural), ("tile_blocked", blocked)):
                t = tile_topk(q, k, ids, rho)
                entry[method] = {
                    "density": t["density"],
                    "k_tile": t["k_tile"],
                    "tiles": t["tiles"],
                }
                selections.append((t["selected"][:, :, ids[idx]], ids))
            entries.append(entry)
        sums = drift_sums(q, k, v, idx, selections).tolist()
        for e, entry in enumerate(entries):
            for m, method in enumerate(METHODS):
                d = Drift.from_sums(sums[e * len(METHODS) + m], n_vectors)
                entry[method].update(rel_l2=d.rel_l2, mass_kept=d.mass_kept)
        kinds[kind] = {
            "blocks": layout.num_blocks,
            "chunk": list(_chunk(base, kind)),
            "results": entries,
        }
    del q, k, v
    return {"grid": list(grid), "tokens": s, "seconds": time.perf_counter() - t0, "kinds": kinds}


def _param(fields: dict, kind: str) -> dict:
    if fields["select"] == "topk":
        from vmoba.config import LAYER_KINDS

        return {"topk": fields["topk"][LAYER_KINDS.index(kind)]}
    return {"tau": fields["threshold"]}


def _chunk(cfg, kind: str) -> tuple:
    return tuple(c for c in cfg.chunk_for(kind) if c is not None)


def verdicts(grids: list) -> list:
    """Per grid, kind and mode: the method with the lowest error, and how VMoBA compares."""
    out = []
    for g in grids:
        for kind, entry in g["kinds"].items():
            for r in entry["results"]:
                best = min(METHODS, key=lambda m: r[m]["rel_l2"])
                best_tile = min(METHODS[1:], key=lambda m: r[m]["rel_l2"])
                vm, tl = r["vmoba"], r[best_tile]
                out.append(
                    {
                        "grid": g["grid"],
                        "kind": kind,
                        "mode": r["mode"],
                        "best": best,
                        "vmoba_rel_l2": vm["rel_l2"],
                        "best_tile": best_tile,
                        "tile_rel_l2": tl["rel_l2"],
                        "vmoba_mass_kept": vm["mass_kept"],
                        "tile_mass_kept": tl["mass_kept"],
                        "vmoba_loses": vm["rel_l2"] > tl["rel_l2"],
                    }
                )
    return out


def run_synthetic(args) -> dict:
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    grids = [scaled(g, args.scale) for g in parse_grids(args.grids)]
    results = []
    for i, grid in enumerate(grids):
        print(
            f"grid {grid} ({math.prod(grid)} tokens), {args.heads} heads x {args.head_dim} ...",
            file=sys.stderr,
        )
        results.append(
            compare_grid(
                grid,
                heads=args.heads,
                head_dim=args.head_dim,
                tau=args.tau,
                tile=args.tile,
                rows=args.rows,
                seed=args.seed + i,
                device=device,
            )
        )
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    full = args.heads == HEADS and args.head_dim == HEAD_DIM and args.scale == 1.0
    record = {
        "bench": "quality-synthetic",
        **environment(device),
        "device": device,
        "full_size": full,
        "inputs": {
            "generator": "vmoba.inputs.locality_qkv (num_waves 12, max_cycles 3, noise 0.5)",
            "batch": 1,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": "float32",
            "seed": args.seed,
            "seeds": "seed + grid index",
            "scale": args.scale,
        },
        "tau": args.tau,
        "tile": args.tile,
        "rows": args.rows,
        "selection": "reference (exact), fp32",
        "tile_scoring": "mean q . mean k per (query tile, key tile); own tile always kept; the same "
        "k_tile for every query tile and head, the density nearest VMoBA's",
        "orders": {
            "tile_natural": "raster order of the latent grid",
            "tile_blocked": "VMoBA's permuted order for the layer kind (blocks contiguous)",
        },
        "grids": results,
        "verdicts": verdicts(results),
    }
    tag = "" if full else f"-h{args.heads}" + (f"-s{args.scale:g}" if args.scale != 1.0 else "")
    dev = gpu_slug() if torch.device(device).type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS_DIR / f"quality-synthetic-{dev}{tag}.json"
    write_json(out, record)
    print(table(record))
    return record


def table(record: dict) -> str:
    head = (
        f"{'grid':<12} {'kind':<4} {'mode':<17} {'density':>7} | {'VMoBA L2':>8} {'mass':>5} | "
        f"{'dens':>5} {'natural L2':>10} {'mass':>5} | {'dens':>5} {'blocked L2':>10} {'mass':>5} | best"
    )
    lines = [head, "-" * len(head)]
    for g in record["grids"]:
        name = "x".join(str(x) for x in g["grid"])
        for kind, entry in g["kinds"].items():
            for r in entry["results"]:
                vm, tn, tb = (r[m] for m in METHODS)
                best = min(METHODS, key=lambda m: r[m]["rel_l2"])
                lines.append(
                    f"{name:<12} {kind:<4} {r['mode']:<17} {vm['density']:7.3f} | {vm['rel_l2']:8.3f} "
                    f"{vm['mass_kept']:5.3f} | {tn['density']:5.3f} {tn['rel_l2']:10.3f} {tn['mass_kept']:5.3f} | "
                    f"{tb['density']:5.3f} {tb['rel_l2']:10.3f} {tb['mass_kept']:5.3f} | {best}"
                )
    losses = [v for v in record["verdicts"] if v["vmoba_loses"]]
    lines.append(
        f"VMoBA has the larger error than the better tile mask in {len(losses)} of "
        f"{len(record['verdicts'])} cases"
    )
    return "\n".join(lines)
