"""What both selection algorithms share: host checks and the Triton helpers that load a query
tile, score it against the block means and write selected blocks as bit words.

The selection is a bitmask `[B, H, S, W]` int32, `W = C_PAD // 32`: bit `c % 32` of word `c // 32`
is set when query `i` attends to block `c`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 1024  # C_PAD <= 1024: each query's scores are sorted in registers


def interpreting() -> bool:
    """True under Triton's CPU interpreter (`TRITON_INTERPRET=1`): small tiles, CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_supported(q: torch.Tensor, num_blocks: int) -> None:
    """Raise `ValueError` for inputs the Triton kernels do not handle."""
    if not (q.is_cuda or interpreting()):
        raise ValueError(
            "kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use kernel='reference'"
        )
    allowed = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.float32)
    if q.dtype not in allowed:
        raise ValueError(f"kernel='triton' supports {allowed} on {q.device.type}, got {q.dtype}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256) or (q.is_cuda and d not in (64, 128)):
        raise ValueError(f"kernel='triton' supports head dim D in (64, 128), got {d}")
    if num_blocks > MAX_BLOCKS:
        raise ValueError(
            f"kernel='triton' supports at most {MAX_BLOCKS} blocks per layer, got {num_blocks}; "
            "use larger chunks"
        )
    if q.shape[1] * num_blocks >= 2**32 or q.shape[1] >= 2**29:
        raise ValueError(f"too many tokens for the triton kernels: S={q.shape[1]}")


def pad_blocks(num_blocks: int) -> int:
    """`C_PAD`: the block count padded to a power of two of at least 32 (one bit word)."""
    return max(32, triton.next_power_of_2(num_blocks))


@triton.jit
def _monotone_key(x):
    """fp32 -> int32 whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _query_tile(q_ptr, i_b, i_h, o_i, m_i, stride_qb, stride_qs, stride_qh, D: tl.constexpr):
    """The queries `o_i` of one head, `[BM, D]`."""
    o_d = tl.arange(0, D)
    p_q = (
        q_ptr
        + i_b.to(tl.int64) * stride_qb
        + o_i[:, None].to(tl.int64) * stride_qs
        + i_h * stride_qh
        + o_d[None, :]
    )
    return tl.load(p_q, mask=m_i[:, None], other=0.0)


@triton.jit
def _gate_scores(
    b_q,
    km_hi_ptr,
    km_lo_ptr,
    i_bh,
    c0,
    CW: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Gate scores `[BM, CW]` (fp32) of a query tile against the block means `[c0, c0 + CW)`."""
    o_d = tl.arange(0, D)
    o_c = c0 + tl.arange(0, CW)
    p_km = (i_bh * C_PAD + o_c[:, None]).to(tl.int64) * D + o_d[None, :]
    b_hi = tl.load(km_hi_ptr + p_km)  # [CW, D], rows >= C are zero
    if IEEE:  # noqa: SIM108  (Triton kernel: a constexpr branch, one tl.dot per specialization)
        b_g = tl.dot(b_q, tl.trans(b_hi), input_precision="ieee")
    else:
        b_g = tl.dot(b_q, tl.trans(b_hi))
    if SPLIT:
        b_lo = tl.load(km_lo_ptr + p_km)
        b_g += tl.dot(b_q, tl.trans(b_lo))
    return b_g


@triton.jit
def _selection_bits(b_sel, o_c):
    """Bit `c % 32` of each selected block `o_c` (int32; a row's bits of one word sum to its word:
    distinct bits never carry, bit 31 included)."""
    return tl.where(b_sel, (1 << (o_c % 32))[None, :], 0)


@triton.jit
def _attended_tokens(lengths_ptr, b_sel, m_i, o_c, C):
    """Tokens the selected blocks `o_c` hold, summed over the tile's valid queries (fp32)."""
    b_len = tl.load(lengths_ptr + o_c, mask=o_c < C, other=0).to(tl.float32)
    return tl.sum(tl.sum(tl.where(b_sel & m_i[:, None], b_len[None, :], 0.0), axis=1), axis=0)
