"""Attention training benchmark: VMoBA forward + backward against dense cuDNN and FlexAttention at
equal density, Wan 2.1 1.3B self-attention shapes (B=1, H=12, D=128, bf16), in one process.

The protocol of `bench.attention` with a backward: for each preset and layer kind (paper chunks),
`threshold_global` 0.25 and top-k at ~25% density on locality-structured inputs. `fwd_bwd_ms`: the
forward with grad on (selection included) and `torch.autograd.grad` of the three inputs for a
fixed random output gradient; `fwd_ms`: the inference forward (no grad) of the same call. Baselines
in the same run: SDPA cuDNN forward + backward (dense), and FlexAttention forward + backward with
a random 128x128 block mask of the VMoBA record's density (full blocks, the diagonal kept).
`peak_extra_mem_over_q`: VMoBA's peak allocation during forward + backward beyond the inputs,
the output gradient and the three input gradients, over the size of `q`. `--bwd-configs`: several
backward configs (`VMOBA_BWD_CONFIG` JSON each, e.g. '{}' and '{"fused_dq": true}') measured in
turn against the same baselines; every VMoBA record keeps the config in effect (`bwd_config`).

    python -m bench.attention_backward [--presets wan1.3b-576p-93f ...] [--out DIR] [--rep-ms 300]
        [--bwd-configs JSON ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import attention as fwd_bench
from bench.common import (
    PRESETS,
    RESULTS_DIR,
    bwd_config,
    bwd_label,
    environment,
    gpu_slug,
    median_ms,
    preset_inputs,
    topk_for_density,
    write_json,
)
from vmoba import VMoBAConfig, num_blocks, vmoba_attention
from vmoba.config import LAYER_KINDS
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

DEFAULT_PRESETS = ("wan1.3b-576p-93f", "wan1.3b-720p-81f")


def grads_ms(fn, inputs, grad_out, rep_ms) -> float:
    """Median time of `fn(*inputs)` and the gradients of `inputs` for `grad_out`."""

    def run():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return median_ms(run, rep_ms)


def cudnn_fwd_bwd_ms(q, k, v, grad_out, rep_ms) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = [x.transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v)]
    go = grad_out.transpose(1, 2).contiguous()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return grads_ms(F.scaled_dot_product_attention, inputs, go, rep_ms)


def flex_fwd_bwd_ms(q, k, v, grad_out, density, rep_ms) -> tuple[float, float]:
    b, s, h, _ = q.shape
    inputs = [fwd_bench.flex_layout(x).requires_grad_(True) for x in (q, k, v)]
    mask, achieved = fwd_bench.random_block_mask(b, h, s, density)
    flex = fwd_bench.compiled_flex()
    go = fwd_bench.flex_layout(grad_out)
    return grads_ms(lambda *x: flex(*x, block_mask=mask), inputs, go, rep_ms), achieved


def vmoba_fwd_bwd(q, k, v, grad_out, grid, kind, cfg, rep_ms) -> dict:
    layer = LAYER_KINDS.index(kind)
    assert cfg.kind(layer) == kind
    inputs = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def call(*x):
        return vmoba_attention(*x, grid=grid, layer_idx=layer, config=cfg, kernel="triton")

    torch.autograd.grad(call(*inputs), inputs, grad_out)  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(call(*inputs), inputs, grad_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * 2 for g in grads)
    del grads
    both = grads_ms(call, inputs, grad_out, rep_ms)
    with torch.no_grad():
        fwd = median_ms(lambda: call(q, k, v), rep_ms)
    layout = block_layout(grid, kind, cfg, device=q.device)
    density = float(select_bits(q, k, layout, cfg, kind).density())
    q_bytes = q.numel() * q.element_size()
    return dict(
        fwd_bwd_ms=both,
        fwd_ms=fwd,
        bwd_ms=both - fwd,
        density=density,
        peak_extra_mem_over_q=extra / q_bytes,
    )


def run_preset(name, env, records, rep_ms, bwd_overrides=(None,)):
    grid = PRESETS[name]
    q, k, v, base = preset_inputs(name, env)
    grad_out = torch.randn_like(q)
    cudnn = cudnn_fwd_bwd_ms(q, k, v, grad_out, rep_ms)
    records.append(
        {
            **base,
            "layer_kind": "all",
            "impl": "sdpa_cudnn",
            "select": "dense",
            "density": 1.0,
            "fwd_bwd_ms": cudnn,
        }
    )
    print(f"{name} sdpa_cudnn fwd+bwd: {cudnn:.2f} ms", flush=True)
    paper = VMoBAConfig.for_grid(grid)
    for kind in LAYER_KINDS:
        kk = topk_for_density(0.25, num_blocks(grid, kind, paper))
        settings = {
            "threshold_global0.25": paper.replace(select="threshold_global", threshold=0.25),
            f"topk{kk}": paper.replace(select="topk", topk=(kk, kk, kk)),
        }
        for label, cfg in settings.items():
            measured = []
            for override in bwd_overrides:
                try:
                    with bwd_config(override) as bwd:
                        res = vmoba_fwd_bwd(q, k, v, grad_out, grid, kind, cfg, rep_ms)
                except Exception:
                    traceback.print_exc()
                    continue
                rec = {
                    **base,
                    "layer_kind": kind,
                    "impl": "vmoba",
                    "select": label,
                    "bwd_config": bwd,
                    **res,
                    "speedup_vs_cudnn": cudnn / res["fwd_bwd_ms"],
                }
                records.append(rec)
                measured.append(rec)
                print(
                    f"{name} {kind} vmoba {label} [{bwd_label(bwd)}]: fwd+bwd "
                    f"{res['fwd_bwd_ms']:.2f} ms (fwd {res['fwd_ms']:.2f}) density "
                    f"{res['density']:.3f} x{rec['speedup_vs_cudnn']:.2f} "
                    f"mem {res['peak_extra_mem_over_q']:.2f}q",
                    flush=True,
                )
            if not measured:
                continue
            try:
                # one Flex baseline for every backward config: the density is the selection's
                fms, fdens = flex_fwd_bwd_ms(q, k, v, grad_out, measured[0]["density"], rep_ms)
                records.append(
                    {
                        **base,
                        "layer_kind": kind,
                        "impl": "flex",
                        "select": f"random_blocks_for_{label}",
                        "density": fdens,
                        "fwd_bwd_ms": fms,
                        "speedup_vs_cudnn": cudnn / fms,
                    }
                )
                for rec in measured:
                    rec["speedup_vs_flex"] = fms / rec["fwd_bwd_ms"]
                print(f"{name} {kind} flex @ {fdens:.3f}: {fms:.2f} ms x{cudnn / fms:.2f}")
            except Exception:
                traceback.print_exc()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(DEFAULT_PRESETS))
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--rep-ms", type=int, default=300, help="timing budget per measurement")
    ap.add_argument(
        "--bwd-configs",
        nargs="+",
        type=json.loads,
        default=[None],
        metavar="JSON",
        help="backward configs to measure in turn (VMOBA_BWD_CONFIG each, e.g. '{}' for the "
        "defaults and '{\"fused_dq\": true}'); default: the environment's",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.attention_backward needs a CUDA GPU")
    env = environment()
    print(env, flush=True)
    records: list = []
    path = Path(args.out) / f"attention-backward-{gpu_slug()}.json"
    for name in args.presets:
        run_preset(name, env, records, args.rep_ms, args.bwd_configs)
        write_json(path, {"environment": env, "records": records})
    table(records)


def table(records):
    print(
        "\n| tokens | kind | impl | select | backward | density | fwd+bwd ms | fwd ms | x cuDNN "
        "| x flex |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        fwd = r.get("fwd_ms")
        flex = r.get("speedup_vs_flex")
        bwd = bwd_label(r["bwd_config"]) if "bwd_config" in r else ""
        print(
            f"| {r['tokens']} | {r['layer_kind']} | {r['impl']} | {r['select']} | {bwd} | "
            f"{r['density']:.3f} | {r['fwd_bwd_ms']:.2f} | {'' if fwd is None else f'{fwd:.2f}'} | "
            f"{r.get('speedup_vs_cudnn', 1.0):.2f} | {'' if flex is None else f'{flex:.2f}'} |"
        )


if __name__ == "__main__":
    main()
