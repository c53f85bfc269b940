"""VMoBA forward at the serving shape (batch 2 for CFG, 12 heads x 128, bf16) against cuDNN and
FlexAttention, and a kernel against a baseline kernel module in the same process.

For each preset and layer kind at the default top-k (`vmoba.defaults.topk_for_grid`):
- `cudnn_ms` (dense SDPA, before the preset's kinds; `cudnn_ms_after` after them), `flex_ms`
  (random 128x128 block mask of the same density);
- per kernel (the baseline module, then this tree's `vmoba.kernels.attention` with each config
  override): `fwd_ms` (selection + attention, what a layer costs), `attend_ms` (attention alone
  on a fixed selection, the index build included), `unwritten` (elements of a NaN-poisoned
  output left NaN), `percent_of_ideal` =
  `100 * density * cudnn_ms / fwd_ms` (perfect efficiency runs the density's share of cuDNN's
  time), whether its output is bit-identical to the baseline's, and the error against the
  plain-PyTorch masked attention on sampled rows (fp32 math);
- `kernels_us`: GPU time per kernel of one forward (selection and attention; torch profiler):
  where the time goes.

`fwd_ms` is the median of `--rounds` medians, each round timing every kernel in turn.

    python -m bench.attention_smallblock --baseline vmoba.kernels.attention_baseline \
        [--presets ...] [--variants '[{}, {"BM": 64}]'] [--rep-ms 200] [--out DIR]

`--baseline` names a module with the kernel to compare against (e.g. the previous
`vmoba/kernels/attention.py` copied under another name); without it only this tree's runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

from bench import attention as attention_bench
from bench.common import (
    PRESETS,
    RESULTS_DIR,
    environment,
    median_ms,
    preset_inputs,
    write_json,
)
from vmoba import VMoBAConfig, block_ids, reference
from vmoba.config import LAYER_KINDS
from vmoba.defaults import topk_for_grid
from vmoba.kernels import attention as current
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout

BATCH = 2  # the two classifier-free-guidance passes of a denoising step
DEFAULT_PRESETS = ("wan1.3b-480p-81f", "wan1.3b-720p-81f")


def kernel_times(fn) -> dict:
    """GPU microseconds per kernel name of one `fn()` call (mean of 3 profiled calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return {e.key[:80]: round(e.device_time_total / 3, 1) for e in prof.key_averages()}


def reference_error(q, k, v, sel, out, grid, kind, cfg, rows) -> dict:
    """Max abs and relative L2 error of `out` on `rows` against the masked reference (fp32)."""
    ids = block_ids(grid, kind, cfg, device=q.device)
    scale = 1 / math.sqrt(q.shape[-1])
    mask = sel.to_bool()[:, :, rows]
    ref = reference.masked_attention(q[:, rows].float(), k.float(), v.float(), mask, ids, scale)
    got = out[:, rows].float()
    return dict(
        max_abs_err=float((got - ref).abs().max()),
        rel_l2_err=float((got - ref).norm() / ref.norm()),
        rows_checked=len(rows),
    )


def run_kind(name, grid, kind, q, k, v, cudnn, kernels, args, base) -> list[dict]:
    paper = VMoBAConfig.for_grid(grid)
    topk = topk_for_grid(grid)
    cfg = paper.replace(select="topk", topk=topk)
    layout = block_layout(grid, kind, cfg, device=q.device)
    scale = 1 / math.sqrt(q.shape[-1])
    sel = select_bits(q, k, layout, cfg, kind)
    density = float(sel.density())
    sel_ms = median_ms(lambda: select_bits(q, k, layout, cfg, kind), args.rep_ms)
    common = {
        **base,
        "layer_kind": kind,
        "topk": topk[LAYER_KINDS.index(kind)],
        "blocks": layout.num_blocks,
        "max_block_len": layout.max_len,
        "density": density,
        "cudnn_ms": cudnn,
        "selection_ms": sel_ms,
    }
    first_out = None
    rows = torch.randperm(q.shape[1], device=q.device)[: args.rows].sort().values
    runs = []  # (module, override, record) of the kernels measured at this preset
    for label, module, override in kernels:
        if name in override.get("presets", [name]):
            override = {key: val for key, val in override.items() if key != "presets"}
            runs.append(
                (module, override, {**common, "kernel": label, "config_override": override})
            )
    # rounds over all kernels, so a drift of the GPU's clocks reaches each about alike
    for rnd in range(args.rounds):
        for module, override, rec in runs:
            if "error" in rec:
                continue
            os.environ["VMOBA_ATTN_CONFIG"] = json.dumps(override)
            attend = module.attend
            try:
                if rnd == 0:
                    # compiles; NaN-poisoned output and state: what no tile wrote stays NaN
                    out = torch.full_like(q, math.nan)
                    attend(q, k, v, sel, scale, out=out, poison=True)
                    rec["unwritten"] = int(out.isnan().sum())
                    rec["config"] = module.attention_config(q.shape[-1], False, layout.max_len)
                    if first_out is None:
                        first_out = out
                    rec["bit_identical_to_first"] = bool(torch.equal(out, first_out))
                    rec.update(reference_error(q, k, v, sel, out, grid, kind, cfg, rows))
                    del out
                    rec["attend_ms"] = median_ms(
                        lambda a=attend: a(q, k, v, sel, scale), args.rep_ms
                    )
                    if args.profile:
                        rec["kernels_us"] = kernel_times(
                            lambda a=attend: a(q, k, v, select_bits(q, k, layout, cfg, kind), scale)
                        )
                rec.setdefault("fwd_ms_rounds", []).append(
                    median_ms(
                        lambda a=attend: a(q, k, v, select_bits(q, k, layout, cfg, kind), scale),
                        args.rep_ms,
                    )
                )
            except Exception as exc:
                traceback.print_exc()
                rec["error"] = repr(exc)[:500]
            finally:
                os.environ.pop("VMOBA_ATTN_CONFIG", None)
    records = []
    for _, override, rec in runs:
        if "fwd_ms_rounds" in rec:
            rec["fwd_ms"] = sorted(rec["fwd_ms_rounds"])[len(rec["fwd_ms_rounds"]) // 2]
            rec["speedup_vs_cudnn"] = cudnn / rec["fwd_ms"]
            rec["percent_of_ideal"] = 100 * density * cudnn / rec["fwd_ms"]
        records.append(rec)
        print(
            f"{name} {kind} {rec['kernel']} {json.dumps(override)}: "
            + ", ".join(
                f"{key} {rec[key]:.3f}"
                if isinstance(rec.get(key), float)
                else f"{key} {rec.get(key)}"
                for key in (
                    "fwd_ms",
                    "attend_ms",
                    "percent_of_ideal",
                    "bit_identical_to_first",
                    "rel_l2_err",
                    "unwritten",
                    "fwd_ms_rounds",
                )
            ),
            flush=True,
        )
    if not args.flex:
        return records
    try:
        fms, fdens = attention_bench.flex_ms(q, k, v, density)
        records.append(
            {
                **common,
                "kernel": "flex",
                "flex_density": fdens,
                "fwd_ms": fms,
                "speedup_vs_cudnn": cudnn / fms,
            }
        )
        print(f"{name} {kind} flex @ {fdens:.3f}: {fms:.2f} ms", flush=True)
    except Exception as exc:
        traceback.print_exc()
        records.append({**common, "kernel": "flex", "error": repr(exc)[:500]})
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(DEFAULT_PRESETS))
    ap.add_argument("--kinds", nargs="*", default=list(LAYER_KINDS))
    ap.add_argument("--baseline", default=None, help="module with the kernel to compare against")
    ap.add_argument(
        "--variants", default="[{}]", help="JSON list of config overrides for this tree's kernel"
    )
    ap.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    ap.add_argument("--rows", type=int, default=256, help="rows checked against the reference")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all kernels")
    ap.add_argument("--out", default=str(RESULTS_DIR / "attention-smallblock.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.attention_smallblock needs a CUDA GPU")
    attention_bench.REP_MS = args.rep_ms
    kernels = []
    if args.baseline:
        kernels.append(("baseline", importlib.import_module(args.baseline), {}))
    # an override may name the presets it is for: {"presets": ["wan1.3b-720p-81f"], "BM": 64}
    kernels += [("current", current, v) for v in json.loads(args.variants)]
    env = environment()
    print(env, flush=True)
    records: list = []
    for name in args.presets:
        grid = PRESETS[name]
        q, k, v, base = preset_inputs(name, env, BATCH)
        cudnn = attention_bench.dense_ms(q, k, v, "cudnn")
        print(f"{name} cudnn {cudnn:.2f} ms", flush=True)
        for kind in args.kinds:
            records += run_kind(name, grid, kind, q, k, v, cudnn, kernels, args, base)
            write_json(Path(args.out), {"environment": env, "records": records})
        # again at the end: how far the GPU's speed drifted over the preset's runs
        after = attention_bench.dense_ms(q, k, v, "cudnn")
        print(f"{name} cudnn again {after:.2f} ms", flush=True)
        for rec in records:
            if rec["preset"] == name:
                rec["cudnn_ms_after"] = after
        write_json(Path(args.out), {"environment": env, "records": records})
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
