"""Triton kernels for the sparse attention itself: queries gathered per selected key block.

Every key block `c` is an "expert": the queries that selected it are gathered into full
`BM`-row tiles, each tile attends to the block's `L_c` keys only, so executed work stays close
to useful work (a tile iterating the union of its rows' blocks would do 2-4x more).

The per-block results of a query are merged by log-sum-exp into its running output in place, in
block order, so no partial buffers are needed: extra memory is the running output (fp16, the
size of `q`), the row statistics, the query index and the keys/values in blocked order (2D/3D
layers). A query's first block writes its state without reading it and its last block writes
the final output directly.

The index is built once per call: `vmoba_count_kernel` counts, per (block, sample-head,
token tile), the queries that selected the block; an exclusive scan of those counts places every
(block, sample-head) "segment" in one flat list; `vmoba_scatter_kernel` writes the segments,
each query with flags saying whether the block is its first or last. The list is the transposed
(key block -> queries) index a backward pass needs too.

A third small kernel writes the work list (item -> segment). One persistent launch walks all
segments, block-major, taking tiles by ticket (two at a time). A tile of block `c` may only merge
once the same sample-head's previous non-empty block is complete, so it waits on that segment's
done-counter; tickets are taken in order, so the wait always ends (everything it waits for was
taken earlier by a running program) and is rare (the segment was handed out about a whole block
of tiles earlier). A program releases an item's counter after its next item's key loop, when the
stores have long landed, and always before it waits. No launch per block and no tail per block.
"""

from __future__ import annotations

import triton
import triton.language as tl

# a query-list entry: token index in the low 29 bits, then "last selected block", "first selected block"
FIRST_FLAG = tl.constexpr(1 << 30)
LAST_FLAG = tl.constexpr(1 << 29)
INDEX_MASK = tl.constexpr((1 << 29) - 1)


@triton.jit
def _has_block(p_m, m_i, c):
    """Bit `c` of each query's selection words at `p_m` ([BLK] pointers)."""
    word = tl.load(p_m + c // 32, mask=m_i, other=0)
    return (((word >> (c % 32)) & 1) != 0) & m_i


@triton.jit
def vmoba_count_kernel(mask_ptr, tile_count_ptr, S, BH, C, n_ct, W: tl.constexpr, BLK: tl.constexpr):
    """`tile_count[c, bh, t]`: queries of token tile `t` of sample-head `bh` that selected block `c`."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BLK + tl.arange(0, BLK)
    m_i = o_i < S
    p_m = mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W
    for c in range(C):
        n_hit = tl.sum(_has_block(p_m, m_i, c).to(tl.int32), axis=0)
        tl.store(tile_count_ptr + (c * BH + i_bh) * n_ct + i_t, n_hit)


@triton.jit
def vmoba_scatter_kernel(mask_ptr, tile_base_ptr, qlist_ptr, S, BH, C, n_ct, W: tl.constexpr, BLK: tl.constexpr):
    """Write each query of the tile into its blocks' segments at `tile_base[c, bh, t] + rank`."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BLK + tl.arange(0, BLK)
    m_i = o_i < S
    p_m = mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W
    highest = tl.full([BLK], -1, dtype=tl.int32)
    for c in range(C):
        highest = tl.where(_has_block(p_m, m_i, c), c, highest)
    seen = o_i < 0
    for c in range(C):
        hit = _has_block(p_m, m_i, c)
        base = tl.load(tile_base_ptr + (c * BH + i_bh) * n_ct + i_t)
        pos = base + (tl.cumsum(hit.to(tl.int32), axis=0) - 1)
        info = o_i | tl.where(seen, 0, FIRST_FLAG) | tl.where(highest == c, LAST_FLAG, 0)
        tl.store(qlist_ptr + pos, info, mask=hit)
        seen = seen | hit


@triton.jit
def _attend_keys_at(b_q, b_m, b_l, b_acc, k_desc, v_desc, row, col, j0, block_len, qk_scale,
                    BN: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax: rows `row + j0 ..`, columns `col ..` of blocked K/V."""
    b_k = k_desc.load([row + j0, col])  # [BN, D]
    b_v = v_desc.load([row + j0, col])  # [BN, D]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))  # [BM, BN]
    if j0 + BN > block_len:  # the block's last, partial key tile (a uniform branch): keys past
        # the block's end belong to the next block
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
def vmoba_items_kernel(seg_tiles_ptr, first_tile_ptr, item_seg_ptr, BLK: tl.constexpr):
    """The work list: `item_seg[first_tile[s] + t] = s` for every tile `t` of segment `s`."""
    seg = tl.program_id(0)
    n = tl.load(seg_tiles_ptr + seg)
    first = tl.load(first_tile_ptr + seg)
    for t0 in range(0, n, BLK):
        o_t = t0 + tl.arange(0, BLK)
        tl.store(item_seg_ptr + first + o_t, seg + o_t * 0, mask=o_t < n)


@triton.jit
def _item(work, total, item_seg_ptr, first_tile_ptr, seg_count_ptr, seg_start_ptr, qlist_ptr,
          BM: tl.constexpr):
    """Segment of work item `work` and its queries' info words (-1 past the segment's end)."""
    live = work < total
    seg = tl.load(item_seg_ptr + work, mask=live, other=0)
    first = tl.load(first_tile_ptr + seg)
    count = tl.load(seg_count_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    o_r = (work - first) * BM + tl.arange(0, BM)
    info = tl.load(qlist_ptr + start + o_r, mask=(o_r < count) & live, other=-1)
    return seg, info


@triton.jit
def vmoba_fwd_kernel(
    q_ptr, k_desc, v_desc, o_ptr, acc_ptr, ml_ptr, qlist_ptr,
    seg_start_ptr, seg_count_ptr, seg_tiles_ptr, first_tile_ptr, item_seg_ptr, wait_ptr, done_ptr, ticket_ptr,
    starts_ptr, lengths_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    H, S, BH, n_seg, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GRAB: tl.constexpr, IEEE: tl.constexpr,
):
    """Every tile of every segment. Segment `c * BH + bh`: the queries of sample-head `bh` that
    selected key block `c`, `qlist[seg_start : seg_start + seg_count]`; work item `w` is tile
    `w - first_tile[s]` of segment `s = item_seg[w]`.

    `k_desc, v_desc`: tensor descriptors over the keys/values in blocked token order, viewed as
    `[B*S, H*D]` with `[BN, D]` tiles (a block's keys are contiguous rows). `acc [B, S, H, D]`
    holds each query's output so far, normalised (its dtype, fp32 or fp16, sets the merge
    precision and traffic), and `ml [BH, S, 2]` its running max (log2 domain) and denominator.

    The next item's ticket, segment and query list are loaded before this item's key loop, so
    their chain of dependent loads is hidden behind the matmuls.
    """
    o_d = tl.arange(0, D)
    total = tl.load(first_tile_ptr + n_seg)
    work = tl.atomic_add(ticket_ptr, 1) * GRAB
    finished = -1  # the segment of the previous item, merged but not yet released
    seg, info = _item(work, total, item_seg_ptr, first_tile_ptr, seg_count_ptr, seg_start_ptr, qlist_ptr, BM)
    while work < total:
        i_c = seg // BH
        i_bh = seg % BH
        i_b = i_bh // H
        i_h = i_bh % H
        m_r = info >= 0
        tok = (info & INDEX_MASK).to(tl.int64)
        first = (info & FIRST_FLAG) != 0
        last = (info & LAST_FLAG) != 0
        p_q = q_ptr + i_b.to(tl.int64) * stride_qb + tok[:, None] * stride_qs + i_h * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)  # [BM, D]
        block_start = tl.load(starts_ptr + i_c)
        block_len = tl.load(lengths_ptr + i_c)
        wait = tl.load(wait_ptr + seg)

        # tickets hand out GRAB consecutive items at a time (fewer atomics, each a stall)
        if (work + 1) % GRAB == 0:
            next_work = tl.atomic_add(ticket_ptr, 1) * GRAB
        else:
            next_work = work + 1
        next_seg, next_info = _item(next_work, total, item_seg_ptr, first_tile_ptr, seg_count_ptr, seg_start_ptr,
                                    qlist_ptr, BM)

        b_m = tl.full([BM], -float("inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        row = i_b * S + block_start
        col = i_h * D
        # the partial last key tile runs inside the pipelined loop: as a separate step after it,
        # its load was exposed (H200, 720p 2D top-k 25%: 19.27 ms vs 20.18)
        for j in range(0, tl.cdiv(block_len, BN)):
            b_m, b_l, b_acc = _attend_keys_at(b_q, b_m, b_l, b_acc, k_desc, v_desc, row, col, j * BN, block_len,
                                              qk_scale, BN, IEEE)

        # release the previous item now that its stores have long completed (a release right after
        # them waits for them); always before waiting below, which may depend on it
        if finished >= 0:
            tl.atomic_add(done_ptr + finished, 1, sem="release")
        # the previous non-empty block of this sample-head must have merged before this one does
        if wait >= 0:
            need = tl.load(seg_tiles_ptr + wait)
            got = tl.atomic_add(done_ptr + wait, 0, sem="acquire")
            while got < need:
                got = tl.atomic_add(done_ptr + wait, 0, sem="acquire")
            tl.debug_barrier()

        # merge with the query's earlier blocks (log-sum-exp, in place; .cg: written by other SMs)
        p_ml = ml_ptr + (i_bh.to(tl.int64) * S + tok) * 2
        p_acc = acc_ptr + i_b.to(tl.int64) * stride_ob + tok[:, None] * stride_os + i_h * stride_oh + o_d[None, :]
        old = m_r & ~first
        m_old = tl.load(p_ml, mask=old, other=-float("inf"), cache_modifier=".cg")
        l_old = tl.load(p_ml + 1, mask=old, other=0.0, cache_modifier=".cg")
        o_old = tl.load(p_acc, mask=old[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)  # normalised
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
        tl.debug_barrier()  # every thread's stores before the release
        finished = seg
        work = next_work
        seg = next_seg
        info = tl.where(next_info >= 0, next_info, -1)  # same value; carrying next_info itself crashed
        # Triton's layout pass (RemoveLayoutConversions) for 64-row tiles
    if finished >= 0:
        tl.atomic_add(done_ptr + finished, 1, sem="release")
