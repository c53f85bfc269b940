"""Tuning data for the kernels: block sizes, warps and stages, kept apart from the code.

GPU numbers are starting points for Hopper (H100/H200, D=128, bf16); the comments say why each
was chosen, the measurements behind them are in `bench/results/` and the commit history. The
interpreter gets small tiles so CPU tests stay fast.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Gate/selection kernels: BM queries per program against all C_PAD block means.
# bins: histogram bins of each of threshold_global's two levels. CAP: per-head room for the pairs
# of the band that holds the cutoff (candidates). direct: a head whose first-level band fits CAP
# skips the second level. At Wan 720p with the paper's chunks the first bands hold 21-56K pairs a
# head in 2D and 3D, so with CAP 64K every head is direct, measured faster than two levels on the
# H200. Fewer bins with more room were no faster: the histogram pass gets cheaper only down to
# Triton's histogram floor, while compaction, band histogram and patch grow with the band.
_GATE_GPU = {"num_warps": 4, "CAP": 65536, "bins": 256, "direct": True}
_GATE_INTERPRETER = {"num_warps": 4, "CAP": 1024, "bins": 256, "direct": True}


# Block-mean pooling: programs sum `split` tokens of a block, `BT` at a time. split 256 gives more
# programs to hide load latency (measured slightly faster than 1024 on the H200 at 720p, 128 about
# the same); BT 128 with 8 warps or BT 32 were slower.
_POOL_GPU = {"split": 256, "BT": 64, "num_warps": 4}
_POOL_INTERPRETER = {"split": 64, "BT": 32, "num_warps": 4}


def pool_config(interpreter: bool) -> dict:
    if interpreter:
        return dict(_POOL_INTERPRETER)
    # tuning hook for bench/tune_selection.py: VMOBA_POOL_CONFIG='{"split": 256}'
    return {**_POOL_GPU, **json.loads(os.environ.get("VMOBA_POOL_CONFIG", "{}"))}


def gate_config(c_pad: int, head_dim: int, interpreter: bool) -> dict:
    base = dict(_GATE_INTERPRETER if interpreter else _GATE_GPU)
    # the [BM, C_PAD] score tile and its sort keys live in registers
    base["BM"] = 64 if interpreter else (64 if c_pad <= 128 else (32 if c_pad <= 256 else 16))
    if not interpreter:  # tuning hook for bench/tune_selection.py: VMOBA_GATE_CONFIG='{"BM": 128}'
        base.update(json.loads(os.environ.get("VMOBA_GATE_CONFIG", "{}")))
    return base


# Attention: BM gathered queries x BN keys per step; `grab` work items per ticket.
_ATTN_GPU = {
    64: {
        "BM": 128,
        "BN": 64,
        "num_warps": 4,
        "num_stages": 3,
        "ctas_per_sm": 2,
        "compact_block": 1024,
        "partial_dtype": "float16",
        "grab": 2,
    },
    # measured on the H200 (720p 2D top-k 25%): BN 128 with 3 stages beat 2 stages, BN 64 and
    # BM 64 x 2 CTAs; fp16 running outputs beat fp32 (half the traffic)
    128: {
        "BM": 128,
        "BN": 128,
        "num_warps": 8,
        "num_stages": 3,
        "ctas_per_sm": 1,
        "compact_block": 1024,
        "partial_dtype": "float16",
        "grab": 2,
    },
}
# Short blocks: a tile runs only a few key tiles, so its start and merge weigh more; two programs
# per SM overlap one's start with the other's matmuls. Measured on the H200: BM 64 is faster for
# 480p's blocks (455 keys in 3D, 1,365 in 2D), BM 128 from 720p 2D's 1,890 keys on.
# early_merge: a tile loads its merge state behind its key loop (H100, 480p batch 2: the kernel
# 3-4% faster in 2D and 3D); at BM 128 its registers spill. BN 32, alone or with three programs
# per SM (maxnreg 168), was slower at 480p in every kind.
_ATTN_GPU_SHORT_BLOCKS = {
    128: {
        "BM": 64,
        "BN": 64,
        "num_warps": 4,
        "num_stages": 3,
        "ctas_per_sm": 2,
        "early_merge": True,
    }
}
SHORT_BLOCK = 1536  # keys
_ATTN_INTERPRETER = {
    "BM": 32,
    "BN": 32,
    "num_warps": 4,
    "num_stages": 1,
    "programs": 2,
    "compact_block": 256,
    "partial_dtype": "float16",
    "grab": 2,
    "early_merge": True,  # as the short-block GPU config
}


def attention_config(head_dim: int, interpreter: bool, max_block_len: int) -> dict:
    if interpreter:
        return dict(_ATTN_INTERPRETER)
    cfg = dict(_ATTN_GPU[head_dim])
    if max_block_len <= SHORT_BLOCK:
        cfg.update(_ATTN_GPU_SHORT_BLOCKS.get(head_dim, {}))
    # tuning hook for bench/tune_attention.py: VMOBA_ATTN_CONFIG='{"BN": 64, "num_stages": 4}'
    cfg.update(json.loads(os.environ.get("VMOBA_ATTN_CONFIG", "{}")))
    return cfg


# Backward: `dkdv` programs hold BN keys (dK, dV accumulate in fp32 registers) and walk the
# block's gathered queries BM at a time; `dq` tiles take BM gathered queries (the backward builds
# its own query index in tiles of this BM) against BN keys at a time. Measured on the H100 at
# 576p, top-k 25%, every layer kind (bench/results/tuning-backward-h100-a63120e.json): dkdv BM 64 x BN 128
# with 8 warps, 2 stages took 26.5-27.5 ms (BM 32: 31-34, 3 stages or BM 128 or BN 64 x 4 warps:
# about the same, BN 128 x 4 warps: 79-84); dq BM 128 x BN 64, 8 warps, 3 stages took 11.0-16.6 ms
# against 13.3-21.5 for BM 64 x BN 64, 4 warps, 2 CTAs per SM.
# fused_dq: the dK/dV kernel also adds each tile's dQ atomically (FA2's way) and the dq kernel is
# not launched: 5 matrix products per tile pair instead of 7, but one fp32 atomic add per (query,
# key tile, channel) instead of per (query, selected block, channel); the dq tiles then go unused.
# On the H100 the atomics cost more than the two products saved: fused dK/dV+dQ 48-50 ms against
# 37.7-44.2 split, best of six tiles (bench/results/tuning-backward-h100.json), so it stays off.
_BWD_GPU = {
    "fused_dq": False,
    "dkdv": {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2},
    "dq": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3, "ctas_per_sm": 1},
}
# the interpreter's cost is per program and per loop step: large tiles keep CPU tests short
_BWD_INTERPRETER = {
    "fused_dq": False,
    "dkdv": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1},
    "dq": {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 1, "programs": 2},
}


def backward_config(interpreter: bool) -> dict:
    """The backward's config; `VMOBA_BWD_CONFIG` overrides it, under the interpreter too (tests
    choose the variant with it): `'{"fused_dq": true, "dkdv": {"BM": 32}, "dq": {"BN": 128}}'`
    (tuning hook for bench/tune_backward.py and bench/attention_backward.py)."""
    base = _BWD_INTERPRETER if interpreter else _BWD_GPU
    cfg: dict[str, Any] = {name: dict(c) if isinstance(c, dict) else c for name, c in base.items()}
    for name, change in json.loads(os.environ.get("VMOBA_BWD_CONFIG", "{}")).items():
        if name not in cfg:
            raise ValueError(f"VMOBA_BWD_CONFIG: unknown key {name!r}, expected one of {list(cfg)}")
        if isinstance(cfg[name], dict):
            cfg[name].update(change)
        else:
            cfg[name] = change
    return cfg
