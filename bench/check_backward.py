"""GPU correctness of the Triton backward at the real Wan grids (bf16), recorded as JSON.

For every preset, layer kind and selection (`threshold_global` 0.25, top-k at ~25% density;
locality-structured inputs, paper chunks): `dq, dk, dv` of `vmoba_attention(kernel="triton")`
against the plain-PyTorch masked attention's autograd (fp32 math) on the kernels' own selection.
The output gradient is random on a random sample of `--rows` query rows and zero elsewhere, so
the reference needs scores for those rows only while `dk` and `dv` are still compared whole (the
kernels run every query). Reported: relative L2 error `|g - g_ref| / |g_ref|` of `dq` (sampled
rows), `dk` and `dv`, and of the output rows.

    python -m bench.check_backward [--presets ...] [--rows 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch

from bench.common import (
    PRESETS,
    RESULTS_DIR,
    environment,
    gpu_slug,
    preset_inputs,
    topk_for_density,
    write_json,
)
from vmoba import VMoBAConfig, num_blocks, reference, vmoba_attention
from vmoba.config import LAYER_KINDS
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout


def settings_for(paper: VMoBAConfig, grid, kind) -> dict:
    kk = topk_for_density(0.25, num_blocks(grid, kind, paper))
    return {
        "threshold_global0.25": paper.replace(select="threshold_global", threshold=0.25),
        f"topk{kk}": paper.replace(select="topk", topk=(kk, kk, kk)),
    }


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def check(q, k, v, grid, kind, cfg, rows) -> dict:
    layer = LAYER_KINDS.index(kind)
    assert cfg.kind(layer) == kind
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = vmoba_attention(*leaves, grid=grid, layer_idx=layer, config=cfg, kernel="triton")
    grad_out = torch.zeros_like(out)
    grad_out[:, rows] = torch.randn_like(out[:, rows])
    dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    layout = block_layout(grid, kind, cfg, device=q.device)
    # the selection is deterministic: the one the forward used
    selection = select_bits(q, k, layout, cfg, kind)
    picked = selection.to_bool()[:, :, rows]
    qr = q[:, rows].float().requires_grad_(True)
    kf, vf = (x.float().requires_grad_(True) for x in (k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    ref = reference.masked_attention(qr, kf, vf, picked, layout.ids, scale)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kf, vf), grad_out[:, rows].float())
    return dict(
        density=float(selection.density()),
        out_rel_l2=rel_l2(out[:, rows].detach(), ref.detach()),
        dq_rel_l2=rel_l2(dq[:, rows], rq),
        dk_rel_l2=rel_l2(dk, rk),
        dv_rel_l2=rel_l2(dv, rv),
        grads_finite=bool(all(g.isfinite().all() for g in (dq, dk, dv))),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.check_backward needs a CUDA GPU")
    env = environment()
    records: list = []
    path = Path(args.out) / f"backward-check-{gpu_slug()}.json"
    for name in args.presets:
        grid = PRESETS[name]
        q, k, v, base = preset_inputs(name, env)
        rows = torch.randperm(q.shape[1], device="cuda")[: args.rows].sort().values
        paper = VMoBAConfig.for_grid(grid)
        for kind in LAYER_KINDS:
            for label, cfg in settings_for(paper, grid, kind).items():
                try:
                    res = check(q, k, v, grid, kind, cfg, rows)
                except Exception:
                    traceback.print_exc()
                    continue
                rec = dict(**base, layer_kind=kind, select=label, rows=args.rows, **res)
                records.append(rec)
                print(
                    f"{name} {kind} {label}: density {res['density']:.3f} out {res['out_rel_l2']:.2e} "
                    f"dq {res['dq_rel_l2']:.2e} dk {res['dk_rel_l2']:.2e} dv {res['dv_rel_l2']:.2e}",
                    flush=True,
                )
                write_json(path, {"environment": env, "records": records})


if __name__ == "__main__":
    main()
