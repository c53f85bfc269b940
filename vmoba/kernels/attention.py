"""Triton kernels for the sparse attention itself: queries gathered per selected key block.

Every key block `c` is an "expert": the queries that selected it are gathered into full
`BM`-row tiles, each tile attends to the block's `L_c` keys only, so executed work stays close
to useful work (a tile iterating the union of its rows' blocks would do 2-4x more).

The per-block results of a query are merged by log-sum-exp into its running output in place.
Blocks are processed in waves, one launch per block index `c` (all heads at once), so a query
never has two partial results in flight and no partial buffers are needed: extra memory is the
running output (fp16, the size of `q`), the row statistics, the per-wave query list, and the
keys/values in blocked order (2D/3D layers). A query's first wave writes its state without
reading it and its last wave writes the final output directly, so there is no separate pass.

The compaction kernel of wave `c` lists, for every (sample, head), the queries whose bitmask has
bit `c`, with flags saying whether `c` is the query's first or last selected block. That list,
read per key block, is the transposed (key block -> queries) index a backward pass needs too.
"""

from __future__ import annotations

import triton
import triton.language as tl

FIRST_FLAG = 1 << 30
LAST_FLAG = 1 << 29
INDEX_MASK = (1 << 29) - 1


@triton.jit
def vmoba_compact_kernel(
    mask_ptr, qlist_ptr, count_ptr,
    S, c, W: tl.constexpr, BLK: tl.constexpr,
):
    """Queries of every (sample, head) whose selection has block `c` -> `qlist[bh, :count[bh]]`."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BLK + tl.arange(0, BLK)
    m_i = o_i < S
    p_m = mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W
    w_c = c // 32
    b_c = c % 32
    word = tl.load(p_m + w_c, mask=m_i, other=0).to(tl.int64) & 0xFFFFFFFF
    hit = ((word >> b_c) & 1) != 0
    below = (word & ((1 << b_c) - 1)) != 0
    above = (word >> (b_c + 1)) != 0
    for w in tl.static_range(W):
        other = tl.load(p_m + w, mask=m_i, other=0) != 0
        below = below | (other & (w < w_c))
        above = above | (other & (w > w_c))
    hit = hit & m_i
    n_hit = tl.sum(hit.to(tl.int32), axis=0)
    base = tl.atomic_add(count_ptr + i_bh, n_hit)
    pos = base + tl.cumsum(hit.to(tl.int32), axis=0) - 1
    info = o_i | tl.where(below, 0, 1 << 30) | tl.where(above, 0, 1 << 29)
    tl.store(qlist_ptr + i_bh.to(tl.int64) * S + pos, info, mask=hit)


@triton.jit
def _attend_keys_at(b_q, b_m, b_l, b_acc, k_desc, v_desc, row, col, j0, block_len, qk_scale,
                    BN: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax: rows `row + j0 ..`, columns `col ..` of blocked K/V."""
    b_k = k_desc.load([row + j0, col])  # [BN, D]
    b_v = v_desc.load([row + j0, col])  # [BN, D]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))  # [BM, BN]
    if MASKED:  # keys past the block's end belong to the next block
        b_s = tl.where((j0 + tl.arange(0, BN) < block_len)[None, :], b_s, -float("inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, axis=1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - b_mn[:, None])
    alpha = tl.math.exp2(b_m - b_mn)
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    if IEEE:
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
    else:
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_mn, b_l, b_acc


@triton.jit
def vmoba_fwd_kernel(
    q_ptr, k_desc, v_desc, o_ptr, acc_ptr, ml_ptr, qlist_ptr, count_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    H, S, BH, block_start, block_len, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BH_PAD: tl.constexpr, IEEE: tl.constexpr,
):
    """One wave: every tile of queries that selected the key block at `block_start`.

    `k_desc, v_desc`: tensor descriptors over the keys/values in blocked token order, viewed as
    `[B*S, H*D]` with `[BN, D]` tiles (the block's keys are contiguous rows). A persistent grid
    walks the wave's tiles (all heads); tile `t` of head `bh` holds the queries
    `qlist[bh, t*BM : (t+1)*BM]`. `acc [B, S, H, D]` holds each query's output so far, normalised
    (its dtype, fp32 or fp16, sets the merge precision and traffic), and `ml [BH, S, 2]` its
    running max (log2 domain) and softmax denominator.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # tiles per (sample, head) and their prefix, to map a work index to (bh, tile)
    o_bh = tl.arange(0, BH_PAD)
    counts = tl.load(count_ptr + o_bh, mask=o_bh < BH, other=0)
    tiles = (counts + BM - 1) // BM
    ends = tl.cumsum(tiles, axis=0)
    total = tl.sum(tiles, axis=0)
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BM)
    n_full = block_len // BN
    for work in range(pid, total, n_prog):
        i_bh = tl.sum((ends <= work).to(tl.int32), axis=0)
        start_t = tl.sum(tl.where(o_bh == i_bh, ends - tiles, 0), axis=0)
        count = tl.sum(tl.where(o_bh == i_bh, counts, 0), axis=0)
        i_b = i_bh // H
        i_h = i_bh % H
        o_r = (work - start_t) * BM + o_m
        m_r = o_r < count
        info = tl.load(qlist_ptr + i_bh.to(tl.int64) * S + o_r, mask=m_r, other=0)
        tok = (info & ((1 << 29) - 1)).to(tl.int64)
        first = (info & (1 << 30)) != 0
        last = (info & (1 << 29)) != 0

        p_q = q_ptr + i_b.to(tl.int64) * stride_qb + tok[:, None] * stride_qs + i_h * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)  # [BM, D]
        b_m = tl.full([BM], -float("inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        row = i_b * S + block_start
        col = i_h * D
        for j in range(0, n_full):
            b_m, b_l, b_acc = _attend_keys_at(b_q, b_m, b_l, b_acc, k_desc, v_desc, row, col, j * BN, block_len,
                                              qk_scale, BN, False, IEEE)
        if n_full * BN < block_len:
            b_m, b_l, b_acc = _attend_keys_at(b_q, b_m, b_l, b_acc, k_desc, v_desc, row, col, n_full * BN,
                                              block_len, qk_scale, BN, True, IEEE)

        # merge with the query's earlier blocks (log-sum-exp, in place)
        p_ml = ml_ptr + (i_bh.to(tl.int64) * S + tok) * 2
        p_acc = acc_ptr + i_b.to(tl.int64) * stride_ob + tok[:, None] * stride_os + i_h * stride_oh + o_d[None, :]
        old = m_r & ~first
        m_old = tl.load(p_ml, mask=old, other=-float("inf"))
        l_old = tl.load(p_ml + 1, mask=old, other=0.0)
        o_old = tl.load(p_acc, mask=old[:, None], other=0.0).to(tl.float32)  # normalised
        m_new = tl.maximum(m_old, b_m)
        a_old = l_old * tl.math.exp2(m_old - m_new)
        a_new = tl.math.exp2(b_m - m_new)
        b_acc = o_old * a_old[:, None] + b_acc * a_new[:, None]
        b_l = a_old + b_l * a_new
        keep = m_r & ~last
        tl.store(p_ml, m_new, mask=keep)
        tl.store(p_ml + 1, b_l, mask=keep)
        tl.store(p_acc, (b_acc / b_l[:, None]).to(acc_ptr.dtype.element_ty), mask=keep[:, None])
        p_o = o_ptr + i_b.to(tl.int64) * stride_ob + tok[:, None] * stride_os + i_h * stride_oh + o_d[None, :]
        done = m_r & last
        tl.store(p_o, (b_acc / b_l[:, None]).to(o_ptr.dtype.element_ty), mask=done[:, None])
