"""Per-query selection (`topk`, `threshold_query`): one pass over each query tile.

Each program scores a `[BM, C_PAD]` tile of gate scores; each query's `C` scores become sortable
int32 keys and its cutoff is found by bisection on the keys, ties going to the lower block.
Top-k with small k instead takes the best remaining block k-1 times. The program writes the
tile's bit words and its attended-token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _attended_tokens, _gate_scores, _monotone_key, _query_tile, _selection_bits

TOPK_ITER_MAX = 16  # top-k picks per query up to which repeated max beats bisection


@triton.jit
def _row_condition(b_key, b_val, other, cut, n_self, target, topk, MODE_TOPK: tl.constexpr):
    """Does taking self plus every other block with key >= `cut` ([BM] int64) meet the rule?"""
    taken = other & (b_key.to(tl.int64) >= cut[:, None])
    if MODE_TOPK:
        return 1 + tl.sum(taken.to(tl.int32), axis=1) >= topk
    return n_self + tl.sum(tl.where(taken, b_val, 0.0), axis=1) >= target


@triton.jit
def _store_mask(
    mask_ptr,
    lengths_ptr,
    att_ptr,
    b_sel,
    i_bh,
    i_t,
    o_i,
    m_i,
    S,
    n_tiles,
    C,
    BM: tl.constexpr,
    C_PAD: tl.constexpr,
):
    """Write selected blocks as bit words, and the tile's attended-token count."""
    W: tl.constexpr = C_PAD // 32
    o_c = tl.arange(0, C_PAD)
    words = tl.sum(tl.reshape(_selection_bits(b_sel, o_c), [BM, W, 32]), axis=2)  # [BM, W]
    o_w = tl.arange(0, W)
    p_m = mask_ptr + (i_bh.to(tl.int64) * S + o_i[:, None]) * W + o_w[None, :]
    tl.store(p_m, words, mask=m_i[:, None])
    tl.store(att_ptr + i_bh * n_tiles + i_t, _attended_tokens(lengths_ptr, b_sel, m_i, o_c, C))


@triton.jit
def vmoba_query_select_kernel(
    q_ptr,
    km_hi_ptr,
    km_lo_ptr,
    ids_ptr,
    lengths_ptr,
    mask_ptr,
    att_ptr,  # outputs: bit words [B, H, S, W], attended tokens [BH, n_tiles]
    stride_qb,
    stride_qs,
    stride_qh,
    H,
    S,
    C,
    n_tiles,
    tau,
    topk,
    BM: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    MODE_TOPK: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    TOPK_ITER: tl.constexpr,
):
    """Select the blocks of one `[BM, C_PAD]` query tile of one head and write its mask."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = i_t * BM + tl.arange(0, BM)
    m_i = o_i < S
    b_q = _query_tile(q_ptr, i_b, i_h, o_i, m_i, stride_qb, stride_qs, stride_qh, D)
    self_c = tl.load(ids_ptr + o_i, mask=m_i, other=0).to(tl.int32)

    o_c = tl.arange(0, C_PAD)
    b_g = _gate_scores(b_q, km_hi_ptr, km_lo_ptr, i_bh, 0, C_PAD, C_PAD, D, SPLIT, IEEE)
    is_self = o_c[None, :] == self_c[:, None]  # [BM, C_PAD]
    valid = m_i[:, None] & (o_c < C)[None, :]
    other = valid & ~is_self
    if TOPK_ITER:
        # ---- top-k with small k: take the best remaining other block k-1 times ----
        # (keys are unique: value bits high, C_PAD-1-c low, so equal values go to the lower
        # block; one row reduction a step, cheaper than the 33-step bisection below while k is small)
        b_unique = (_monotone_key(b_g).to(tl.int64) << 32) | (C_PAD - 1 - o_c)[None, :]
        b_unique = tl.where(other, b_unique, -9223372036854775807 - 1)
        for _ in range(tl.minimum(topk, C) - 1):
            best = tl.max(b_unique, axis=1)
            b_unique = tl.where(b_unique == best[:, None], -9223372036854775807 - 1, b_unique)
        b_sel = valid & (is_self | (other & (b_unique == -9223372036854775807 - 1)))
        _store_mask(
            mask_ptr, lengths_ptr, att_ptr, b_sel, i_bh, i_t, o_i, m_i, S, n_tiles, C, BM, C_PAD
        )
        return
    if MODE_TOPK:
        b_val = b_g
    else:
        lo = tl.min(tl.where(valid, b_g, float("inf")), axis=1)
        hi = tl.max(tl.where(valid, b_g, -float("inf")), axis=1)
        span = hi - lo
        flat = span <= 1e-6 * tl.maximum(tl.abs(hi), tl.abs(lo))
        b_val = (b_g - lo[:, None]) * (1.0 / tl.where(flat, 1.0, span))[
            :, None
        ]  # a product, not a division per pair
        b_val = tl.where(flat[:, None], 1.0, b_val)
    n_self = tl.sum(tl.where(is_self, b_val, 0.0), axis=1)
    target = tau * tl.sum(tl.where(valid, b_val, 0.0), axis=1)
    b_key = _monotone_key(b_val)
    # the cutoff value: the largest key whose "take every other block at or above it" meets
    # the condition, found by bisection on the 32-bit keys (no sort)
    lo_k = tl.min(tl.where(other, b_key, 2147483647), axis=1).to(tl.int64)
    hi_k = tl.max(tl.where(other, b_key, -2147483647 - 1), axis=1).to(tl.int64) + 1
    ok_hi = _row_condition(b_key, b_val, other, hi_k, n_self, target, topk, MODE_TOPK)
    for _ in range(33):  # keys span < 2**33 values
        mid = lo_k + (hi_k - lo_k) // 2
        ok = _row_condition(b_key, b_val, other, mid, n_self, target, topk, MODE_TOPK)
        lo_k = tl.where(ok, mid, lo_k)
        hi_k = tl.where(ok, hi_k, mid)
    # lo_k is now the cutoff value (or the lowest key, if even every block falls short)
    cut = tl.where(ok_hi, 2147483647, lo_k).to(tl.int32)
    above = other & (b_key > cut[:, None])
    ties = other & (b_key == cut[:, None])
    rank = tl.cumsum(ties.to(tl.int32), axis=1) - 1  # lower block first among equal values
    if MODE_TOPK:
        room = tl.minimum(topk, C) - 1 - tl.sum(above.to(tl.int32), axis=1)
        take_tie = ties & (rank < room[:, None])
    else:
        have = n_self + tl.sum(tl.where(above, b_val, 0.0), axis=1)
        tie_val = tl.max(tl.where(ties, b_val, 0.0), axis=1)
        take_tie = ties & (
            (have[:, None] + rank.to(tl.float32) * tie_val[:, None]) < target[:, None]
        )
    b_sel = (is_self | above | take_tie) & valid
    _store_mask(
        mask_ptr, lengths_ptr, att_ptr, b_sel, i_bh, i_t, o_i, m_i, S, n_tiles, C, BM, C_PAD
    )


def select_per_query(
    q, hi, lo, split: bool, layout, bits, attended, cfg: dict, *, mode: str, tau: float, topk: int
) -> None:
    """Launch the per-query selection: fills `bits [B, H, S, W]` and `attended [B*H, n_tiles]`.

    `hi, lo, split`: the gate operands (`selection.gate_operands`); `cfg`: `gate_config`'s.
    """
    b, s, h, d = q.shape
    c = layout.num_blocks
    c_pad = hi.shape[1]
    n_tiles = attended.shape[1]
    vmoba_query_select_kernel[(n_tiles, b * h)](
        q,
        hi,
        lo,
        layout.ids,
        layout.lengths,
        bits,
        attended,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        h,
        s,
        c,
        n_tiles,
        float(tau),
        int(topk),
        BM=cfg["BM"],
        C_PAD=c_pad,
        D=d,
        MODE_TOPK=mode == "topk",
        SPLIT=split,
        IEEE=q.dtype == torch.float32,
        TOPK_ITER=mode == "topk" and min(topk, c) - 1 <= TOPK_ITER_MAX,
        num_warps=cfg["num_warps"],
    )
