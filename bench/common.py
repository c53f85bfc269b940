"""What the benchmarks share, defined once: the results folder, presets, the Wan config, run
metadata (commit, date, versions, GPU name and slug), timing and JSON output.

Importing this module does not import torch (bench/worker_e2e.py's parent process never does);
the helpers that need it import it when called.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

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
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return (
            out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
        )
    except OSError:
        return "unknown"


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second: when a record was measured."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def gpu_name() -> str:
    """The current CUDA device's name, or "cpu" without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str | None = None) -> str:
    """Short GPU name for result file names: 'NVIDIA H100 80GB HBM3' (or a worker's device label
    'cuda (NVIDIA H100 80GB HBM3)') -> 'h100'; other names slugged whole ('geforce-rtx-4090');
    'cpu' -> 'cpu'. Default: this process's GPU."""
    name = gpu_name() if name is None else name
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    if m:
        return m.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("cuda (").rstrip(")")).strip("-")
    return slug.removeprefix("nvidia-") or "cpu"


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device="cuda") -> dict:
    """What a record was measured with: commit, date, GPU and the versions that matter."""
    import torch

    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return {
        "gpu": gpu_name() if cuda else "cpu",
        "commit": commit(),
        "date": timestamp(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        # the kernels' tuning hooks (vmoba/kernels/configs.py), when set
        "config_overrides": {
            key: value
            for key, value in os.environ.items()
            if key.startswith("VMOBA_") and key.endswith("_CONFIG")
        },
    }


@contextmanager
def bwd_config(override: dict | None) -> Iterator[dict]:
    """Run the backward with `VMOBA_BWD_CONFIG` set to `override` (None: as the environment has
    it), restored afterwards; yields the config in effect (what records store)."""
    from vmoba.kernels.configs import backward_config

    key = "VMOBA_BWD_CONFIG"
    before = os.environ.get(key)
    if override is not None:
        os.environ[key] = json.dumps(override)
    try:
        yield backward_config(False)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def bwd_label(cfg: dict) -> str:
    """Short name of a backward config: the variant and its tiles (`BMxBN wW sS`)."""

    def tiles(c: dict) -> str:
        return f"{c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}"

    if cfg["fused_dq"]:
        return f"fused {tiles(cfg['dkdv'])}"
    return f"split {tiles(cfg['dkdv'])} / dq {tiles(cfg['dq'])}"


def wan_transformer_config(tiny: bool = False, num_layers: int | None = None) -> dict:
    """`WanTransformer3DModel` kwargs of the benchmarked model: Wan 2.1 T2V 1.3B (the config the
    worker's random-weight model uses), or the tiny test model's; `num_layers` overrides."""
    if tiny:
        from worker.tiny_model import TRANSFORMER_CONFIG as config
    else:
        from worker.random_model import WAN21_T2V_1_3B as config
    config = dict(config)
    if num_layers:
        config["num_layers"] = num_layers
    return config


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


def preset_inputs(name: str, env: dict, batch: int = 1):
    """Seeded bf16 locality `q, k, v [batch, S, HEADS, HEAD_DIM]` on the GPU for preset `name`,
    and the fields every attention record of it starts with."""
    import torch

    from vmoba.inputs import locality_qkv

    grid = PRESETS[name]
    torch.manual_seed(0)
    q, k, v = locality_qkv(grid, batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    base = dict(
        gpu=env["gpu"],
        commit=env["commit"],
        preset=name,
        tokens=q.shape[1],
        grid=list(grid),
        heads=HEADS,
        head_dim=HEAD_DIM,
        dtype="bf16",
        batch=batch,
    )
    return q, k, v, base
