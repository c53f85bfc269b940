"""One short job per model family through the real worker, on one GPU: time, peak memory and the
attention density each family's default VMoBA settings achieve.

    python -m bench.models                          # every family below, in one file
    python -m bench.models --only wan2.2-ti2v-5b-random

Each run is `bench.worker_e2e` (a private redis-server, `python -m worker` on the GPU with the
full-size architecture and random weights, warmed up at the job's own size so the job runs with
compiled kernels, one job through Redis and RQ) with the model's own
default attention settings (the request sets none), collected into
`bench/results/models-<gpu>.json` keyed by `<model>:<task>`. The videos are noise; the costs are
the real architectures'.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO_ROOT, RESULTS_DIR, gpu_slug

# (model, task, frames, height, width): a short clip at each family's native size. Wan 2.2 A14B
# holds two 14B experts (about 56 GB in bf16) plus the 11 GB text encoder.
RUNS = (
    ("wan2.1-t2v-1.3b-random", "t2v", 17, 480, 832),
    ("wan2.2-ti2v-5b-random", "t2v", 17, 704, 1280),
    ("wan2.2-ti2v-5b-random", "i2v", 17, 704, 1280),
    ("wan2.1-t2v-14b-random", "t2v", 17, 480, 832),
    ("wan2.1-i2v-14b-480p-random", "i2v", 17, 480, 832),
    ("wan2.2-t2v-a14b-random", "t2v", 17, 480, 832),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", help="run only these models (repeatable)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/models-<gpu>.json"
    )
    p.add_argument("--redis-server", default=None)
    p.add_argument("--timeout-s", type=float, default=420)
    args = p.parse_args(argv)
    out = args.out or RESULTS_DIR / f"models-{gpu_slug()}.json"
    failed = 0
    for model, task, frames, height, width in RUNS:
        if args.only and model not in args.only:
            continue
        t0 = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "bench.worker_e2e",
            "--model",
            model,
            "--task",
            task,
            "--frames",
            str(frames),
            "--height",
            str(height),
            "--width",
            str(width),
            "--steps",
            str(args.steps),
            "--warmup-size",
            f"{frames}x{height}x{width}",
            "--timeout-s",
            str(args.timeout_s),
            "--record",
            str(out),
        ]
        if args.redis_server:
            cmd += ["--redis-server", args.redis_server]
        print(f"== {model} {task} {frames}x{height}x{width}, {args.steps} steps", flush=True)
        rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
        print(f"== {model} {task}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        failed += rc != 0
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
