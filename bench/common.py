"""Shared helpers for the GPU benchmarks: presets, run metadata, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Wan 2.1 1.3B self-attention shapes (B=1, H=12, D=128), by latent grid (T, Hg, Wg)
PRESETS = {
    "wan1.3b-480p-81f": (21, 30, 52),  # 32,760 tokens
    "wan1.3b-576p-93f": (24, 36, 64),  # 55,296 tokens
    "wan1.3b-720p-81f": (21, 45, 80),  # 75,600 tokens
}
HEADS, HEAD_DIM = 12, 128


def commit() -> str:
    """The commit measured: `VMOBA_COMMIT` (set it where the checkout has no .git), else git's."""
    if os.environ.get("VMOBA_COMMIT"):
        return os.environ["VMOBA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"([A-Z]\d{2,4}[A-Z]?)", gpu_name())
    return m.group(1).lower() if m else "cpu"


def environment() -> dict:
    import torch
    import triton

    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }


def topk_for_density(density: float, num_blocks: int) -> int:
    """The top-k (self block included) whose density is nearest `density`: round(density * C), at least 1."""
    return max(1, round(density * num_blocks))


def median_ms(fn, rep_ms: int = 1000, warmup_ms: int = 100) -> float:
    """Median time of `fn` in ms with CUDA events (triton's do_bench; L2 flushed between runs)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def write_json(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {path}")
