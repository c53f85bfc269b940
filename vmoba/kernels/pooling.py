"""Block-mean pooling: the mean key of every block, the operand of the gate.

Deterministic: each program sums a fixed slice of `split` tokens of one block (`pool_config`), and
the host adds the slices in a fixed order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..partition import BlockLayout
from .common import interpreting
from .configs import pool_config


@triton.jit
def vmoba_pool_kernel(
    k_ptr,
    perm_ptr,
    starts_ptr,
    lengths_ptr,
    out_ptr,
    stride_kb,
    stride_ks,
    stride_kh,
    H,
    C,
    SPLIT_LEN,
    D: tl.constexpr,
    BT: tl.constexpr,
):
    """Partial sums of the keys of one block slice: `out[b, h, c, split, :]` (fp32)."""
    i_bh, i_c, i_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    start = tl.load(starts_ptr + i_c)
    length = tl.load(lengths_ptr + i_c)
    o_d = tl.arange(0, D)
    b_sum = tl.zeros([D], dtype=tl.float32)
    lo = i_split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, length)
    for j0 in range(lo, hi, BT):
        o_j = j0 + tl.arange(0, BT)
        m_j = o_j < hi
        tok = tl.load(perm_ptr + start + o_j, mask=m_j, other=0).to(tl.int64)
        p_k = (
            k_ptr
            + i_b.to(tl.int64) * stride_kb
            + tok[:, None] * stride_ks
            + i_h * stride_kh
            + o_d[None, :]
        )
        b_k = tl.load(p_k, mask=m_j[:, None], other=0.0).to(tl.float32)  # [BT, D]
        b_sum += tl.sum(b_k, axis=0)
    n_split = tl.num_programs(2)
    tl.store(out_ptr + ((i_bh * C + i_c) * n_split + i_split) * D + o_d, b_sum)


def block_means(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block, `[B*H, C, D]` fp32, deterministic (fixed-split partial sums)."""
    b, s, h, d = k.shape
    cfg = pool_config(interpreting())
    split_len = cfg["split"]
    n_split = max(1, math.ceil(layout.max_len / split_len))
    partial = torch.empty(
        b * h, layout.num_blocks, n_split, d, device=k.device, dtype=torch.float32
    )
    vmoba_pool_kernel[(b * h, layout.num_blocks, n_split)](
        k,
        layout.perm,
        layout.starts,
        layout.lengths,
        partial,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        h,
        layout.num_blocks,
        split_len,
        D=d,
        BT=cfg["BT"],
        num_warps=cfg["num_warps"],
    )
    return partial.sum(2) / layout.lengths.to(torch.float32)[None, :, None]
