"""Attention benchmark (`docs/vmoba.md` section 10): VMoBA forward against dense and block-sparse
baselines, Wan 2.1 1.3B self-attention shapes (B=1, H=12, D=128, bf16), all in one process.

For each preset and layer kind (paper chunks):
- `vmoba`, `topk` with k = round(rho * C) for rho in 25%, 15%, 10% (achieved density reported),
  and `threshold_global` tau = 0.25 on locality-structured inputs (`vmoba.inputs.locality_qkv`:
  q and k share a smooth random field of 12 cosines plus noise of half its scale);
  `fwd_ms` includes pooling, gating and selection; `selection_ms` is that part alone.
- baselines in the same run: SDPA cuDNN and SDPA flash (dense), and FlexAttention with a random
  128x128 block mask of the VMoBA record's density (full blocks, the diagonal always kept).

Timing: `triton.testing.do_bench`, median, CUDA events, L2 flushed between runs, warm-up
excluded. `peak_extra_mem_bytes`: peak allocation during the call beyond inputs and output.
`executed_over_useful`: attention FLOPs the kernel executes (padded tiles) over those the
selection needs.

    python -m bench.attention [--presets wan1.3b-720p-81f ...] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import torch
import torch.nn.functional as F

from bench.common import (
    PRESETS,
    RESULTS_DIR,
    environment,
    gpu_slug,
    median_ms,
    preset_inputs,
    topk_for_density,
    write_json,
)
from vmoba import VMoBAConfig, num_blocks
from vmoba.config import LAYER_KINDS
from vmoba.kernels.attention import attend
from vmoba.kernels.configs import attention_config
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

REP_MS = 1000
TOPK_DENSITIES = (0.25, 0.15, 0.10)


def dense_ms(q, k, v, sdpa: str) -> float:
    """SDPA restricted to one of PyTorch's kernels, `"cudnn"` or `"flash"`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # [B, H, S, D], as they like it
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[sdpa]

    def run():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt)

    return median_ms(run, REP_MS)


_FLEX = None
FLEX_BLOCK = 128


def compiled_flex():
    """FlexAttention compiled once per process (static shapes)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_layout(x: torch.Tensor) -> torch.Tensor:
    """`[B, S, H, D]` -> `[B, H, S_pad, D]`, `S` zero-padded to whole 128-token blocks."""
    s_pad = math.ceil(x.shape[1] / FLEX_BLOCK) * FLEX_BLOCK
    return F.pad(x, (0, 0, 0, 0, 0, s_pad - x.shape[1])).transpose(1, 2).contiguous()


def random_block_mask(b: int, h: int, s: int, density: float, seed: int = 0):
    """A FlexAttention `BlockMask` keeping `round(density * n)` random full 128x128 key blocks
    per query block (the diagonal block always), and the density it has."""
    from torch.nn.attention.flex_attention import BlockMask

    n = math.ceil(s / FLEX_BLOCK)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_row = max(1, round(density * n))
    scores = torch.rand(b, h, n, n, generator=gen)
    eye = torch.eye(n, dtype=torch.bool)
    scores[..., eye] = 2.0  # the diagonal block always kept
    idx = scores.argsort(-1, descending=True)[..., :per_row].sort(-1).values.to(torch.int32)
    idx = torch.cat([idx, torch.zeros(b, h, n, n - per_row, dtype=torch.int32)], -1).cuda()
    counts = torch.full((b, h, n), per_row, dtype=torch.int32, device="cuda")
    zero_counts = torch.zeros_like(counts)
    mask = BlockMask.from_kv_blocks(
        zero_counts, idx, counts, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=None
    )
    return mask, per_row / n


def flex_ms(q, k, v, density: float, seed: int = 0) -> tuple[float, float]:
    """FlexAttention with a random block mask of `density` (128x128 blocks, all full)."""
    b, s, h, _ = q.shape
    qt, kt, vt = (flex_layout(x) for x in (q, k, v))
    mask, achieved = random_block_mask(b, h, s, density, seed)
    flex = compiled_flex()
    ms = median_ms(lambda: flex(qt, kt, vt, block_mask=mask), REP_MS)
    return ms, achieved


def work_ratio(bits_bool, layout, cfg) -> float:
    """Executed over useful attention work of the kernel for a selection `[B, H, S, C]`."""
    q_per_block = bits_bool.sum(2).double()  # [B, H, C]
    lengths = layout.lengths.double()
    bm, bn = cfg["BM"], cfg["BN"]
    executed = (torch.ceil(q_per_block / bm) * bm * (torch.ceil(lengths / bn) * bn)).sum()
    useful = (q_per_block * lengths).sum()
    return float(executed / useful)


def bench_vmoba(q, k, v, grid, kind, cfg):
    layout = block_layout(grid, kind, cfg, device=q.device)
    scale = 1 / math.sqrt(q.shape[-1])

    def full():
        sel = select_bits(q, k, layout, cfg, kind)
        return attend(q, k, v, sel, scale)

    full()  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = full()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    del out
    fwd = median_ms(full, REP_MS)
    sel_ms = median_ms(lambda: select_bits(q, k, layout, cfg, kind), REP_MS)
    sel = select_bits(q, k, layout, cfg, kind)
    density = float(sel.density())
    ratio = work_ratio(sel.to_bool(), layout, attention_config(q.shape[-1], False, layout.max_len))
    return dict(
        fwd_ms=fwd,
        selection_ms=sel_ms,
        density=density,
        peak_extra_mem_bytes=int(extra),
        executed_over_useful=ratio,
    )


def run_preset(name, grid, quick: bool, env: dict, records: list):
    q, k, v, base = preset_inputs(name, env)
    q_bytes = q.numel() * q.element_size()
    dense = {}
    for sdpa in ("cudnn", "flash"):
        try:
            dense[sdpa] = dense_ms(q, k, v, sdpa)
            records.append(
                {
                    **base,
                    "layer_kind": "all",
                    "impl": f"sdpa_{sdpa}",
                    "select": "dense",
                    "density": 1.0,
                    "fwd_ms": dense[sdpa],
                    "selection_ms": 0.0,
                    "peak_extra_mem_bytes": None,
                    "executed_over_useful": 1.0,
                }
            )
            print(f"{name} sdpa_{sdpa}: {dense[sdpa]:.2f} ms", flush=True)
        except Exception as exc:  # a baseline missing on this build is reported, not fatal
            print(f"{name} sdpa_{sdpa} failed: {exc}", flush=True)
    cudnn = dense.get("cudnn")
    paper = VMoBAConfig.for_grid(grid)
    for kind in LAYER_KINDS:
        c = num_blocks(grid, kind, paper)
        layer = LAYER_KINDS.index(kind)
        settings = [("threshold_global", dict(select="threshold_global", threshold=0.25))]
        for rho in TOPK_DENSITIES if not quick else (0.25,):
            kk = topk_for_density(rho, c)
            settings.append((f"topk{kk}", dict(select="topk", topk=(kk, kk, kk))))
        for label, changes in settings:
            cfg = paper.replace(**changes)
            assert cfg.kind(layer) == kind
            try:
                res = bench_vmoba(q, k, v, grid, kind, cfg)
            except Exception:
                traceback.print_exc()
                continue
            rec = {
                **base,
                "layer_kind": kind,
                "impl": "vmoba",
                "select": label,
                "blocks": c,
                **res,
                "peak_extra_mem_over_q": res["peak_extra_mem_bytes"] / q_bytes,
            }
            if cudnn:
                rec["speedup_vs_cudnn"] = cudnn / res["fwd_ms"]
            records.append(rec)
            print(
                f"{name} {kind} vmoba {label}: {res['fwd_ms']:.2f} ms (sel {res['selection_ms']:.2f}) "
                f"density {res['density']:.3f} x{rec.get('speedup_vs_cudnn', 0):.2f} "
                f"mem {rec['peak_extra_mem_over_q']:.2f}q ratio {res['executed_over_useful']:.2f}",
                flush=True,
            )
            try:
                fms, fdens = flex_ms(q, k, v, res["density"])
                frec = {
                    **base,
                    "layer_kind": kind,
                    "impl": "flex",
                    "select": f"random_blocks_for_{label}",
                    "density": fdens,
                    "fwd_ms": fms,
                    "selection_ms": 0.0,
                    "peak_extra_mem_bytes": None,
                    "executed_over_useful": 1.0,
                }
                if cudnn:
                    frec["speedup_vs_cudnn"] = cudnn / fms
                records.append(frec)
                print(
                    f"{name} {kind} flex @ {fdens:.3f}: {fms:.2f} ms x{frec.get('speedup_vs_cudnn', 0):.2f}",
                    flush=True,
                )
            except Exception:
                traceback.print_exc()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--quick", action="store_true", help="top-k at 25%% only")
    ap.add_argument("--rep-ms", type=int, default=1000, help="timing budget per measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.attention needs a CUDA GPU")
    global REP_MS
    REP_MS = args.rep_ms
    env = environment()
    print(env, flush=True)
    records: list = []
    from pathlib import Path

    path = Path(args.out) / f"attention-{gpu_slug()}.json"
    for name in args.presets:
        run_preset(name, PRESETS[name], args.quick, env, records)
        write_json(path, {"environment": env, "records": records})
    table(records)


def table(records):
    print(
        "\n| tokens | kind | impl | select | density | fwd ms | sel ms | x cuDNN | mem/q | exec/useful |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        mem = r.get("peak_extra_mem_over_q")
        print(
            f"| {r['tokens']} | {r['layer_kind']} | {r['impl']} | {r['select']} | {r['density']:.3f} | "
            f"{r['fwd_ms']:.2f} | {r['selection_ms']:.2f} | {r.get('speedup_vs_cudnn', 0):.2f} | "
            f"{'' if mem is None else f'{mem:.2f}'} | {r['executed_over_useful']:.2f} |"
        )


if __name__ == "__main__":
    main()
