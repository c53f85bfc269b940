"""Tuning data for the kernels: block sizes, warps and stages, kept apart from the code.

GPU numbers are starting points for Hopper (H100/H200, D=128, bf16); the measured choices and
their timings are recorded in `bench/results/`. The interpreter gets small tiles so CPU tests
stay fast.
"""

from __future__ import annotations

import json
import os

# Gate/selection kernels: BM queries per program against all C_PAD block means.
# bins: histogram bins of each of threshold_global's two levels. CAP: per-head room for the pairs of the band that holds the cutoff
# (candidates). direct: a head whose first-level band fits CAP skips the second level. H200, Wan
# 720p with the paper's chunks (locality inputs): first bands of 21-56K pairs a head in 2D and 3D,
# so every head is direct (1,249 / 1,267 us for 2D / 3D vs 1,425 / 1,444 two-level, same run).
# 128 bins (CAP 128K) or 64 bins (CAP 256K) were no faster (1,616 / 1,514 and 1,319 / 1,284 us vs
# 1,271 / 1,282, one noisy run). With column groups (run 27): the histogram pass took 350 / 284 / 271
# us at 256 / 128 / 64 bins (min/max alone 131: Triton's histogram has a floor), while compaction,
# band histogram and patch grew with the band (349 -> 365 / 411, 11 -> 16 / 20, 12 -> 23 / 37 us).
_GATE_GPU = {"num_warps": 4, "CAP": 65536, "bins": 256, "direct": True}
_GATE_INTERPRETER = {"num_warps": 4, "CAP": 1024, "bins": 256, "direct": True}


# Block-mean pooling: programs sum `split` tokens of a block, `BT` at a time. H200, 720p (same run,
# noisy): split 256 took 2D top-k 10/40 594 us, 3D top-k 9/36 562 us (split 1024: 604, 589); 128
# about the same; BT 128 with 8 warps or BT 32 slower.
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
    64: {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 2, "compact_block": 1024,
         "partial_dtype": "float16", "grab": 2},
    # H200, 720p 2D top-k 25% (per-block launches then): BN 128 / 3 stages 372 TFLOP/s, 2 stages 337,
    # BN 64 366, BM 64 x2 CTAs 298; fp16 partial outputs 413 (fp32 363 in the same run)
    128: {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3, "ctas_per_sm": 1, "compact_block": 1024,
          "partial_dtype": "float16", "grab": 2},
}
# Short blocks: a tile runs only a few key tiles, so its start and merge weigh more; two programs
# per SM overlap one's start with the other's matmuls. H200, persistent launch with prefetched work
# items: 480p 3D (455-key blocks) top-k 25% 6.24 ms vs 7.46 (BM 128); 480p 2D (1,365 keys) 4.30 vs
# 4.41; 720p 2D (1,890 keys) 20.89 vs 20.29: BM 128 wins from about there on.
_ATTN_GPU_SHORT_BLOCKS = {128: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 2}}
SHORT_BLOCK = 1536  # keys
_ATTN_INTERPRETER = {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1, "programs": 2, "compact_block": 256,
                     "partial_dtype": "float16", "grab": 2}


def attention_config(head_dim: int, interpreter: bool, max_block_len: int) -> dict:
    if interpreter:
        return dict(_ATTN_INTERPRETER)
    cfg = dict(_ATTN_GPU[head_dim])
    if max_block_len <= SHORT_BLOCK:
        cfg.update(_ATTN_GPU_SHORT_BLOCKS.get(head_dim, {}))
    # tuning hook for bench/tune_attention.py: VMOBA_ATTN_CONFIG='{"BN": 64, "num_stages": 4}'
    cfg.update(json.loads(os.environ.get("VMOBA_ATTN_CONFIG", "{}")))
    return cfg
