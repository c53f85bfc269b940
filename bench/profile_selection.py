"""Per-kernel GPU time of one `select_bits` and one `attend` call (torch profiler): where the time goes.

python -m bench.profile_selection [--preset wan1.3b-720p-81f]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import HEAD_DIM, HEADS, PRESETS
from vmoba import VMoBAConfig
from vmoba.inputs import locality_qkv
from vmoba.kernels.attention import attend
from vmoba.kernels.selection import select_bits
from vmoba.partition import block_layout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan1.3b-720p-81f")
    ap.add_argument(
        "--sequence", action="store_true", help="also list one select_bits call's kernels in order"
    )
    args = ap.parse_args()
    grid = PRESETS[args.preset]
    q, k, v = locality_qkv(grid, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    paper = VMoBAConfig.for_grid(grid)
    for label, cfg, kind in (
        ("topk10 2d", paper.replace(select="topk", topk=10), "2d"),
        ("topk4 2d", paper.replace(select="topk", topk=4), "2d"),
        ("threshold_global 2d", paper.replace(select="threshold_global"), "2d"),
    ):
        layout = block_layout(grid, kind, cfg, device="cuda")
        sel = select_bits(q, k, layout, cfg, kind)
        # this case's tensors and settings bound now (not looked up when called)
        calls = (
            (
                "select_bits",
                lambda layout=layout, cfg=cfg, kind=kind: select_bits(q, k, layout, cfg, kind),
            ),
            ("attend", lambda sel=sel: attend(q, k, v, sel, HEAD_DIM**-0.5)),
        )
        for what, fn in calls:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            print(f"--- {label} {what}: per call (5 calls)")
            rows = [(e.key, e.device_time_total / 5, e.count // 5) for e in prof.key_averages()]
            for key, us, n in sorted(rows, key=lambda r: -r[1])[:14]:
                print(f"{us:9.1f} us  x{n:<3d} {key[:90]}")
            if what == "select_bits" and args.sequence:
                # the kernels of the last call in launch order (one name covers every threshold_global pass)
                kernels = [
                    e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                ]
                per_call = len(kernels) // 5
                print(f"--- {label} {what}: the last call's kernels in order")
                for e in sorted(kernels, key=lambda e: e.time_range.start)[-per_call:]:
                    print(f"{e.device_time:9.1f} us  {e.name[:90]}")


if __name__ == "__main__":
    main()
