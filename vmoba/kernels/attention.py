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

Host side: `query_index` builds the index, `attend` launches the attention over a `Selection`,
and `sparse_attention` (what `vmoba_attention` runs on the Triton path) selects and attends.
No host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..config import VMoBAConfig
from ..partition import block_layout
from .blocked import blocked_kv
from .common import interpreting
from .configs import attention_config
from .selection import Selection, select_bits

LOG2E = 1.4426950408889634

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
def vmoba_count_kernel(
    mask_ptr, tile_count_ptr, S, BH, C, n_ct, W: tl.constexpr, BLK: tl.constexpr
):
    """`tile_count[c, bh, t]`: queries of token tile `t` of sample-head `bh` that selected block `c`."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BLK + tl.arange(0, BLK)
    m_i = o_i < S
    p_m = mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W
    for c in range(C):
        n_hit = tl.sum(_has_block(p_m, m_i, c).to(tl.int32), axis=0)
        tl.store(tile_count_ptr + (c * BH + i_bh) * n_ct + i_t, n_hit)


@triton.jit
def vmoba_scatter_kernel(
    mask_ptr, tile_base_ptr, qlist_ptr, S, BH, C, n_ct, W: tl.constexpr, BLK: tl.constexpr
):
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
def _attend_keys_at(
    b_q,
    b_m,
    b_l,
    b_acc,
    k_desc,
    v_desc,
    row,
    col,
    j0,
    block_len,
    qk_scale,
    BN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One key tile of the online softmax: rows `row + j0 ..`, columns `col ..` of blocked K/V."""
    b_k = k_desc.load([row + j0, col])  # [BN, D]
    b_v = v_desc.load([row + j0, col])  # [BN, D]
    if IEEE:  # noqa: SIM108  (Triton kernel: a constexpr branch, one tl.dot per specialization)
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
def _next_work(work, ticket_ptr, GRAB: tl.constexpr):
    """The work item after `work` of this program: the next of its ticket, or a new ticket's first
    (tickets hand out GRAB consecutive items: fewer atomics, each a stall). Relaxed: a ticket
    orders nothing (the default acq_rel fenced first, waiting for the last item's stores)."""
    if (work + 1) % GRAB == 0:  # noqa: SIM108  (Triton kernel: the atomic only on this branch)
        nxt = tl.atomic_add(ticket_ptr, 1, sem="relaxed") * GRAB
    else:
        nxt = work + 1
    return nxt


@triton.jit
def _segment(
    seg, live, first_tile_ptr, seg_count_ptr, seg_start_ptr, wait_ptr, starts_ptr, lengths_ptr, BH
):
    """What an item needs of its segment: first tile, query count and start, its key block's
    start and length, and the segment to wait for (-1: none, or a dead item)."""
    first = tl.load(first_tile_ptr + seg, mask=live, other=0)
    count = tl.load(seg_count_ptr + seg, mask=live, other=0)
    start = tl.load(seg_start_ptr + seg, mask=live, other=0)
    wait = tl.load(wait_ptr + seg, mask=live, other=-1)
    i_c = seg // BH
    block_start = tl.load(starts_ptr + i_c, mask=live, other=0)
    block_len = tl.load(lengths_ptr + i_c, mask=live, other=0)
    return first, count, start, wait, block_start, block_len


@triton.jit
def _queries(work, live, first, count, start, wait, qlist_ptr, seg_tiles_ptr, BM: tl.constexpr):
    """An item's query info words (-1 past its segment's end) and the tile count to wait for."""
    o_r = (work - first) * BM + tl.arange(0, BM)
    info = tl.load(qlist_ptr + start + o_r, mask=(o_r < count) & live, other=-1)
    need = tl.load(seg_tiles_ptr + wait, mask=wait >= 0, other=0)
    return info, need


@triton.jit
def vmoba_fwd_kernel(
    q_ptr,
    k_desc,
    v_desc,
    o_ptr,
    acc_ptr,
    ml_ptr,
    lse_ptr,
    qlist_ptr,
    seg_start_ptr,
    seg_count_ptr,
    seg_tiles_ptr,
    first_tile_ptr,
    item_seg_ptr,
    wait_ptr,
    done_ptr,
    ticket_ptr,
    starts_ptr,
    lengths_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_ob,
    stride_os,
    stride_oh,
    H,
    S,
    BH,
    n_seg,
    qk_scale,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GRAB: tl.constexpr,
    IEEE: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    EARLY: tl.constexpr = False,
):
    """Every tile of every segment. Segment `c * BH + bh`: the queries of sample-head `bh` that
    selected key block `c`, `qlist[seg_start : seg_start + seg_count]`; work item `w` is tile
    `w - first_tile[s]` of segment `s = item_seg[w]`.

    `k_desc, v_desc`: tensor descriptors over the keys/values in blocked token order, viewed as
    `[B*S, H*D]` with `[BN, D]` tiles (a block's keys are contiguous rows). `acc [B, S, H, D]`
    holds each query's output so far, normalised (its dtype, fp32 or fp16, sets the merge
    precision and traffic), and `ml [BH, S, 2]` its running max (log2 domain) and denominator.
    `WRITE_LSE`: also store each query's final log-sum-exp (log2 domain, scale included) in
    `lse [BH, S]`, for the backward.

    Finding an item is a chain of dependent loads (ticket -> segment -> segment data -> query
    list); a program runs it as a pipeline over its next items, one link per item: while item `i`
    computes, the loads for `i + 1` (query list), `i + 2` (segment data), `i + 3` (segment) and
    the ticket for `i + 4` are in flight, each needing only what the previous item's loads
    brought. So no link's latency stalls a tile start; only its query rows and first key tiles do.

    `EARLY`: a tile whose wait is already over when it starts loads its merge state before its
    key loop, behind the matmuls, instead of after it (the state's registers fit 64-row tiles).
    """
    o_d = tl.arange(0, D)
    total = tl.load(first_tile_ptr + n_seg)
    # fill the pipeline: item a (now) complete, b with its segment data, c with its segment, d
    work_a = tl.atomic_add(ticket_ptr, 1, sem="relaxed") * GRAB
    work_b = _next_work(work_a, ticket_ptr, GRAB)
    work_c = _next_work(work_b, ticket_ptr, GRAB)
    work_d = _next_work(work_c, ticket_ptr, GRAB)
    seg_a = tl.load(item_seg_ptr + work_a, mask=work_a < total, other=0)
    seg_b = tl.load(item_seg_ptr + work_b, mask=work_b < total, other=0)
    seg_c = tl.load(item_seg_ptr + work_c, mask=work_c < total, other=0)
    first_a, count_a, start_a, wait_a, bstart_a, blen_a = _segment(
        seg_a,
        work_a < total,
        first_tile_ptr,
        seg_count_ptr,
        seg_start_ptr,
        wait_ptr,
        starts_ptr,
        lengths_ptr,
        BH,
    )
    first_b, count_b, start_b, wait_b, bstart_b, blen_b = _segment(
        seg_b,
        work_b < total,
        first_tile_ptr,
        seg_count_ptr,
        seg_start_ptr,
        wait_ptr,
        starts_ptr,
        lengths_ptr,
        BH,
    )
    info_a, need_a = _queries(
        work_a, work_a < total, first_a, count_a, start_a, wait_a, qlist_ptr, seg_tiles_ptr, BM
    )
    finished = -1  # the segment of the previous item, merged but not yet released
    while work_a < total:
        i_bh = seg_a % BH
        i_b = i_bh // H
        i_h = i_bh % H
        m_r = info_a >= 0
        tok = (info_a & INDEX_MASK).to(tl.int64)
        first = (info_a & FIRST_FLAG) != 0
        last = (info_a & LAST_FLAG) != 0
        p_q = (
            q_ptr
            + i_b.to(tl.int64) * stride_qb
            + tok[:, None] * stride_qs
            + i_h * stride_qh
            + o_d[None, :]
        )
        b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)  # [BM, D]

        # one link of the chain for each of the next items (none depends on another's result)
        info_b, need_b = _queries(
            work_b, work_b < total, first_b, count_b, start_b, wait_b, qlist_ptr, seg_tiles_ptr, BM
        )
        first_c, count_c, start_c, wait_c, bstart_c, blen_c = _segment(
            seg_c,
            work_c < total,
            first_tile_ptr,
            seg_count_ptr,
            seg_start_ptr,
            wait_ptr,
            starts_ptr,
            lengths_ptr,
            BH,
        )
        seg_d = tl.load(item_seg_ptr + work_d, mask=work_d < total, other=0)
        work_e = _next_work(work_d, ticket_ptr, GRAB)

        if EARLY:  # the wait already over? then the merge state loads behind the key loop
            ready = wait_a < 0
            if wait_a >= 0:
                ready = tl.atomic_add(done_ptr + wait_a, 0, sem="acquire") >= need_a
                tl.debug_barrier()
            early = m_r & ~first & ready
            p_pre = ml_ptr + (i_bh.to(tl.int64) * S + tok) * 2
            m_pre = tl.load(p_pre, mask=early, other=-float("inf"), cache_modifier=".cg")
            l_pre = tl.load(p_pre + 1, mask=early, other=0.0, cache_modifier=".cg")
            p_pre = (
                acc_ptr
                + i_b.to(tl.int64) * stride_ob
                + tok[:, None] * stride_os
                + i_h * stride_oh
                + o_d[None, :]
            )
            o_pre = tl.load(p_pre, mask=early[:, None], other=0.0, cache_modifier=".cg")

        b_m = tl.full([BM], -float("inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        row = i_b * S + bstart_a
        col = i_h * D
        # the partial last key tile runs inside the pipelined loop: as a separate step after it,
        # its load is exposed (measured slower on the H200)
        for j in range(0, tl.cdiv(blen_a, BN)):
            b_m, b_l, b_acc = _attend_keys_at(
                b_q,
                b_m,
                b_l,
                b_acc,
                k_desc,
                v_desc,
                row,
                col,
                j * BN,
                blen_a,
                qk_scale,
                BN,
                IEEE,
            )

        # release the previous item now that its stores have long completed (a release right after
        # them waits for them); always before waiting below, which may depend on it
        if finished >= 0:
            tl.atomic_add(done_ptr + finished, 1, sem="release")
        # the previous non-empty block of this sample-head must have merged before this one does
        late = wait_a >= 0
        if EARLY:
            late = late & ~ready
        if late:
            got = tl.atomic_add(done_ptr + wait_a, 0, sem="acquire")
            while got < need_a:
                got = tl.atomic_add(done_ptr + wait_a, 0, sem="acquire")
            tl.debug_barrier()

        # merge with the query's earlier blocks (log-sum-exp, in place; .cg: written by other SMs)
        p_ml = ml_ptr + (i_bh.to(tl.int64) * S + tok) * 2
        p_acc = (
            acc_ptr
            + i_b.to(tl.int64) * stride_ob
            + tok[:, None] * stride_os
            + i_h * stride_oh
            + o_d[None, :]
        )
        old = m_r & ~first
        if EARLY:
            old = old & ~ready
        m_old = tl.load(p_ml, mask=old, other=-float("inf"), cache_modifier=".cg")
        l_old = tl.load(p_ml + 1, mask=old, other=0.0, cache_modifier=".cg")
        # normalised
        o_old = tl.load(p_acc, mask=old[:, None], other=0.0, cache_modifier=".cg")
        if EARLY:
            m_old = tl.where(ready, m_pre, m_old)
            l_old = tl.where(ready, l_pre, l_old)
            o_old = tl.where(ready, o_pre, o_old)
        o_old = o_old.to(tl.float32)
        m_new = tl.maximum(m_old, b_m)
        a_old = l_old * tl.math.exp2(m_old - m_new)
        a_new = tl.math.exp2(b_m - m_new)
        b_acc = o_old * a_old[:, None] + b_acc * a_new[:, None]
        b_l = a_old + b_l * a_new
        keep = m_r & ~last
        tl.store(p_ml, m_new, mask=keep)
        tl.store(p_ml + 1, b_l, mask=keep)
        tl.store(p_acc, (b_acc / b_l[:, None]).to(acc_ptr.dtype.element_ty), mask=keep[:, None])
        p_o = (
            o_ptr
            + i_b.to(tl.int64) * stride_ob
            + tok[:, None] * stride_os
            + i_h * stride_oh
            + o_d[None, :]
        )
        done = m_r & last
        tl.store(p_o, (b_acc / b_l[:, None]).to(o_ptr.dtype.element_ty), mask=done[:, None])
        if WRITE_LSE:
            tl.store(lse_ptr + i_bh.to(tl.int64) * S + tok, m_new + tl.math.log2(b_l), mask=done)
        tl.debug_barrier()  # every thread's stores before the release
        finished = seg_a
        # advance the pipeline by one item
        work_a, seg_a, wait_a, bstart_a, blen_a, need_a = (
            work_b,
            seg_b,
            wait_b,
            bstart_b,
            blen_b,
            need_b,
        )
        # same value; carrying the loaded words themselves crashed Triton's layout pass
        # (RemoveLayoutConversions) for 64-row tiles
        info_a = tl.where(info_b >= 0, info_b, -1)
        work_b, seg_b, first_b, count_b, start_b, wait_b, bstart_b, blen_b = (
            work_c,
            seg_c,
            first_c,
            count_c,
            start_c,
            wait_c,
            bstart_c,
            blen_c,
        )
        work_c, seg_c = work_d, seg_d
        work_d = work_e
    if finished >= 0:
        tl.atomic_add(done_ptr + finished, 1, sem="release")


@dataclass
class QueryIndex:
    """The transposed (key block -> queries) index: segment `c * BH + bh` lists the queries of
    sample-head `bh` that selected block `c`, `qlist[seg_start : seg_start + seg_count]`, each
    with first/last-block flags. `seg_tiles`: its `BM`-query tiles; `first_tile`: their exclusive
    prefix (`[n_seg + 1]`, the total last); `item_seg`: the segment of every tile (work item);
    `wait`: the segment whose merges must finish first (-1: none)."""

    qlist: torch.Tensor
    seg_start: torch.Tensor
    seg_count: torch.Tensor
    seg_tiles: torch.Tensor
    first_tile: torch.Tensor
    item_seg: torch.Tensor
    wait: torch.Tensor


def query_index(selection: Selection, bm: int, blk: int) -> QueryIndex:
    """Build the index on the device (three small kernels and a few scans; no host sync)."""
    b, h, s, words = selection.bits.shape
    c, bh, dev = selection.num_blocks, b * h, selection.bits.device
    n_ct = triton.cdiv(s, blk)
    tile_count = torch.empty(c, bh, n_ct, device=dev, dtype=torch.int32)
    vmoba_count_kernel[(n_ct, bh)](selection.bits, tile_count, s, bh, c, n_ct, W=words, BLK=blk)
    flat = tile_count.view(-1)
    tile_base = torch.cumsum(flat, 0) - flat  # int64, exclusive
    per_query = selection.max_blocks_per_query
    qlist = torch.empty(bh * s * per_query, device=dev, dtype=torch.int32)
    vmoba_scatter_kernel[(n_ct, bh)](
        selection.bits, tile_base, qlist, s, bh, c, n_ct, W=words, BLK=blk
    )
    seg_count = tile_count.sum(-1, dtype=torch.int32).view(-1)  # [C * BH]
    seg_tiles = (seg_count + (bm - 1)) // bm
    first_tile = torch.zeros(c * bh + 1, device=dev, dtype=torch.int32)
    torch.cumsum(seg_tiles, 0, out=first_tile[1:])
    # every segment has at most one partial tile
    item_seg = torch.empty(
        triton.cdiv(bh * s * per_query, bm) + c * bh, device=dev, dtype=torch.int32
    )
    vmoba_items_kernel[(c * bh,)](seg_tiles, first_tile, item_seg, BLK=256)
    # the previous non-empty block of the same sample-head, as a segment index
    block = torch.arange(c, device=dev, dtype=torch.int32)[:, None].expand(c, bh)
    latest = torch.where(seg_tiles.view(c, bh) > 0, block, -1).cummax(0).values
    prev = torch.cat([torch.full((1, bh), -1, device=dev, dtype=torch.int32), latest[:-1]])
    heads = torch.arange(bh, device=dev, dtype=torch.int32)[None, :]
    wait = torch.where(prev >= 0, prev * bh + heads, -1)
    return QueryIndex(
        qlist=qlist,
        seg_start=tile_base.view(c, bh, n_ct)[:, :, 0].contiguous().view(-1),
        seg_count=seg_count,
        seg_tiles=seg_tiles,
        first_tile=first_tile,
        item_seg=item_seg,
        wait=wait.view(-1),
    )


def attend(
    q,
    k,
    v,
    selection: Selection,
    softmax_scale: float,
    out=None,
    poison: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the selected blocks: the query index, then one persistent launch.

    `out`: an optional preallocated `[B, S, H, D]` output. `poison` fills the internal state with
    NaN first (tests: any read of state no block wrote shows up in the output). `lse`: an
    optional `[B*H, S]` fp32 tensor that receives every query's log-sum-exp (log2 domain, scale
    included), which the backward needs.
    """
    b, s, h, d = q.shape
    layout = selection.layout
    c = layout.num_blocks
    bh = b * h
    dev = q.device
    cfg = attention_config(d, interpreting(), layout.max_len)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    # the running output between blocks: fp16 halves its traffic (|values| <= max|v| < 65504);
    # fp32 inputs keep fp32
    partial = torch.float32 if q.dtype == torch.float32 else getattr(torch, cfg["partial_dtype"])
    acc = torch.empty(out.shape, device=dev, dtype=partial)
    ml = torch.empty(bh, s, 2, device=dev, dtype=torch.float32)
    if poison:
        acc.fill_(float("nan"))
        ml.fill_(float("nan"))
    index = query_index(selection, cfg["BM"], cfg["compact_block"])
    n_seg = c * bh
    done = torch.zeros(n_seg + 1, device=dev, dtype=torch.int32)  # per segment, then the ticket
    n_prog = cfg["programs"] if interpreting() else cfg["ctas_per_sm"] * _sm_count(dev)
    # keys and values in blocked order, so every block is a run of rows a TMA descriptor can load
    kb, vb = blocked_kv(k, v, layout)
    k_desc, v_desc = (
        TensorDescriptor.from_tensor(x.view(b * s, h * d), [cfg["BN"], d]) for x in (kb, vb)
    )
    vmoba_fwd_kernel[(n_prog,)](
        q,
        k_desc,
        v_desc,
        out,
        acc,
        ml,
        ml if lse is None else lse,
        index.qlist,
        index.seg_start,
        index.seg_count,
        index.seg_tiles,
        index.first_tile,
        index.item_seg,
        index.wait,
        done,
        done[n_seg:],
        layout.starts,
        layout.lengths,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        s,
        bh,
        n_seg,
        softmax_scale * LOG2E,
        D=d,
        BM=cfg["BM"],
        BN=cfg["BN"],
        GRAB=cfg["grab"],
        IEEE=q.dtype == torch.float32,
        WRITE_LSE=lse is not None,
        EARLY=cfg.get("early_merge", False),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg and not interpreting() else {}),
    )
    return out


def sparse_attention(
    q, k, v, *, grid, kind: str, config: VMoBAConfig, softmax_scale: float, stats=None
):
    """`vmoba_attention` on the device. `q, k, v [B, S, H, D]` -> `[B, S, H, D]`.

    `stats`, if a dict, receives (no sync) `attended`, a 0-dim fp64 device tensor with
    `sum_{b,h,i} |K(b,h,i)|`, and `num_blocks`.
    """
    layout = block_layout(grid, kind, config, device=q.device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    selection = select_bits(q, k, layout, config, kind)
    out = attend(q, k, v, selection, softmax_scale)
    if stats is not None:
        stats["attended"] = selection.attended.double().sum()
        stats["num_blocks"] = layout.num_blocks
    return out


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    idx = torch.device(device).index or 0
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
