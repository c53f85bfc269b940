"""GPU correctness of the Triton path at the real Wan grids (bf16), recorded as JSON.

For every preset, layer kind and selection mode (locality-structured inputs, paper chunks):
- selection: the kernels' against the reference's (`select_blocks(kernel="reference")`, fp32
  gates on the GPU): pairs that differ, and the density of each;
- output: the kernels' output (NaN-poisoned before the call, state poisoned too) against the
  plain-PyTorch masked attention on the kernels' own selection, fp32 math: all rows at 480p, a
  random sample of rows at the larger grids; max abs error and relative L2 error;
- CUDA graphs: selection + attention captured in one graph and replayed on new inputs must give
  bit-identical results to an eager call.

    python -m bench.check_attention [--presets ...] [--rows 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
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
    environment,
    gpu_slug,
    topk_for_density,
    write_json,
)
from vmoba import VMoBAConfig, block_ids, num_blocks, reference, select_blocks
from vmoba.config import LAYER_KINDS
from vmoba.inputs import locality_qkv
from vmoba.kernels.attention import attend
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout


def modes_for(cfg: VMoBAConfig, grid, kind):
    c = num_blocks(grid, kind, cfg)
    kk = topk_for_density(0.25, c)
    return {
        f"topk{kk}": cfg.replace(select="topk", topk=(kk, kk, kk)),
        "threshold_query0.25": cfg.replace(select="threshold_query", threshold=0.25),
        "threshold_global0.25": cfg.replace(select="threshold_global", threshold=0.25),
    }


def output_error(q, k, v, sel_bool, ids, rows):
    """Reference masked attention on `rows` (or all) against given kernel output rows."""
    scale = 1 / math.sqrt(q.shape[-1])
    if rows is None:
        return reference.masked_attention(q, k, v, sel_bool, ids, scale).float()
    return reference.masked_attention(q[:, rows], k, v, sel_bool[:, :, rows], ids, scale).float()


def run_case(q, k, v, grid, kind, cfg, rows):
    layout = block_layout(grid, kind, cfg, device=q.device)
    sel = select_bits(q, k, layout, cfg, kind)
    got = sel.to_bool()
    ref_sel = select_blocks(
        q, k, grid=grid, layer_idx=LAYER_KINDS.index(kind), config=cfg, kernel="reference"
    )
    diff = int((got != ref_sel).sum())
    lens = layout.lengths.double()
    s = q.shape[1]
    ref_density = float(
        (ref_sel.double() * lens).sum() / (ref_sel.shape[0] * ref_sel.shape[1] * s * s)
    )
    del ref_sel
    out = torch.full_like(q, float("nan"))
    attend(q, k, v, sel, 1 / math.sqrt(q.shape[-1]), out=out, poison=True)
    unwritten = int(out.isnan().sum())
    ids = block_ids(grid, kind, cfg, device=q.device)
    ref = output_error(q, k, v, got, ids, rows)
    mine = (out if rows is None else out[:, rows]).float()
    err = (mine - ref).abs()
    rel = float((mine - ref).norm() / ref.norm())
    return dict(
        pairs_total=int(got.numel()),
        pairs_differing=diff,
        density=float(sel.density()),
        reference_density=ref_density,
        unwritten=unwritten,
        max_abs_err=float(err.max()),
        rel_l2_err=rel,
        rows_checked="all" if rows is None else len(rows),
    )


def graph_check(grid, kind, cfg):
    """Capture selection + attention in a CUDA graph; replay on fresh inputs; compare to eager."""
    q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    layout = block_layout(grid, kind, cfg, device="cuda")
    scale = 1 / math.sqrt(HEAD_DIM)

    def step():
        sel = select_bits(q, k, layout, cfg, kind)
        return attend(q, k, v, sel, scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    results = []
    for seed in (1, 2):
        q2, k2, v2 = locality_qkv(
            grid,
            1,
            HEADS,
            HEAD_DIM,
            dtype=torch.bfloat16,
            device="cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        results.append(bool(torch.equal(static_out, eager)))
    return all(results)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--rows", type=int, default=4096, help="rows checked at grids above 480p")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.check_attention needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    records = []
    path = Path(args.out) / f"attention-check-{gpu_slug()}.json"
    for name in args.presets:
        grid = PRESETS[name]
        torch.manual_seed(0)
        q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        s = q.shape[1]
        rows = None if s <= 32_760 else torch.randperm(s, device="cuda")[: args.rows].sort().values
        paper = VMoBAConfig.for_grid(grid)
        for kind in LAYER_KINDS:
            for label, cfg in modes_for(paper, grid, kind).items():
                base = dict(
                    gpu=env["gpu"],
                    commit=env["commit"],
                    preset=name,
                    tokens=s,
                    layer_kind=kind,
                    select=label,
                )
                try:
                    res = run_case(q, k, v, grid, kind, cfg, rows)
                except Exception as exc:
                    traceback.print_exc()
                    res = {"error": repr(exc)}
                records.append({**base, **res})
                print(records[-1], flush=True)
                torch.cuda.empty_cache()
        try:
            cfg = paper.replace(select="threshold_global", threshold=0.25)
            same = graph_check(grid, "3d", cfg)
        except Exception as exc:
            traceback.print_exc()
            same = repr(exc)
        records.append(
            dict(
                gpu=env["gpu"],
                commit=env["commit"],
                preset=name,
                tokens=s,
                layer_kind="3d",
                select="threshold_global0.25",
                cuda_graph_replay_bit_identical=same,
            )
        )
        print(records[-1], flush=True)
        write_json(path, {"environment": env, "records": records})


if __name__ == "__main__":
    main()
