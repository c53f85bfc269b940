"""Triton kernels for the backward of the sparse attention, for a fixed selection.

The gate and the selection are discrete: no gradient flows through them (as in the paper). With
the forward's log-sum-exp `lse_i` (log2 domain, scale included) a selected pair's weight is
`P_ij = exp2(qk_scale * q_i . k_j - lse_i)`, and for the output gradient `dO`:

    delta_i = dO_i . O_i
    dV_j = sum_i P_ij dO_i          dP_ij = dO_i . V_j          dS_ij = P_ij (dP_ij - delta_i)
    dQ_i = scale sum_j dS_ij K_j    dK_j = scale sum_i dS_ij Q_i

with `i, j` over selected pairs only. The work follows the forward's transposed index (key block
-> the queries that selected it, `kernels.attention.QueryIndex`), so it stays proportional to
the selected pairs:

- `vmoba_bwd_delta_kernel`: `delta` for every query (fp32).
- `vmoba_bwd_dkdv_kernel`: one program per (key tile of block `c`, sample-head): its `BN` keys
  and values stay in registers while it walks the segment's gathered queries `BM` at a time;
  dK and dV accumulate in fp32 and are stored once, straight to the keys' natural positions. A
  key tile has one owner, so no atomics; keys of a block no query of the head selected get zeros.
- `vmoba_bwd_dq_kernel`: the index's work items (a segment's gathered query tiles, `BM` rows)
  against their block's keys; a tile's dQ for that block is added to an fp32 buffer with one
  atomic add per (query, selected block, channel), not per key tile.

Or, with the backward config's `fused_dq`, the dK/dV kernel also makes dQ from the `dS` it already
has (`dS^T K` of its key tile, added atomically to the same fp32 buffer) and the dq kernel is not
launched: five matrix products per (query tile, key tile) instead of seven (the dq kernel
recomputes `QK^T` and `dO V^T`), at one atomic add per (query, key tile, channel).

Extra memory: the fp32 dQ buffer (twice `q` in bf16), the keys and values in blocked order (as
the forward makes them), the query index (rebuilt), `delta`. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention import INDEX_MASK, LOG2E, _sm_count, query_index
from .blocked import blocked_kv
from .common import interpreting
from .configs import attention_config, backward_config
from .selection import Selection


@triton.jit
def vmoba_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, H, S, D: tl.constexpr, BLK: tl.constexpr):
    """`delta[bh, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]` in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    tok = (i_t * BLK + tl.arange(0, BLK)).to(tl.int64)
    m_i = tok < S
    offs = ((i_b.to(tl.int64) * S + tok) * H + i_h)[:, None] * D + tl.arange(0, D)[None, :]
    b_o = tl.load(o_ptr + offs, mask=m_i[:, None], other=0.0).to(tl.float32)  # [BLK, D]
    b_do = tl.load(do_ptr + offs, mask=m_i[:, None], other=0.0).to(tl.float32)  # [BLK, D]
    tl.store(delta_ptr + i_bh.to(tl.int64) * S + tok, tl.sum(b_o * b_do, axis=1), mask=m_i)


@triton.jit
def vmoba_bwd_dkdv_kernel(
    q_ptr,
    do_ptr,
    k_desc,
    v_desc,
    dk_ptr,
    dv_ptr,
    dq_ptr,
    lse_ptr,
    delta_ptr,
    qlist_ptr,
    seg_start_ptr,
    seg_count_ptr,
    starts_ptr,
    lengths_ptr,
    perm_ptr,
    H,
    S,
    BH,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """dK, dV of key tile `program_id(0)` of block `c` for sample-head `bh`, segment
    `program_id(1) = c * BH + bh`. `k_desc, v_desc`: blocked keys/values viewed as
    `[B*S, H*D]` with `[BN, D]` tiles; `q, dO, dK, dV` contiguous `[B, S, H, D]` (natural order);
    `lse, delta [BH, S]` fp32. `FUSED_DQ`: also add the tile's dQ to `dq [B, S, H, D]` fp32
    (atomically: every key tile of every selected block adds to a query's row)."""
    i_n, seg = tl.program_id(0), tl.program_id(1)
    i_c = seg // BH
    i_bh = seg % BH
    i_b = i_bh // H
    i_h = i_bh % H
    o_d = tl.arange(0, D)
    block_len = tl.load(lengths_ptr + i_c)
    if i_n * BN < block_len:
        block_start = tl.load(starts_ptr + i_c)
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < block_len
        b_k = k_desc.load([i_b * S + block_start + i_n * BN, i_h * D])  # [BN, D]
        b_v = v_desc.load([i_b * S + block_start + i_n * BN, i_h * D])  # [BN, D]
        start = tl.load(seg_start_ptr + seg)
        count = tl.load(seg_count_ptr + seg)
        b_dk = tl.zeros([BN, D], dtype=tl.float32)
        b_dv = tl.zeros([BN, D], dtype=tl.float32)
        for i0 in range(0, count, BM):
            o_r = i0 + tl.arange(0, BM)
            m_r = o_r < count
            info = tl.load(qlist_ptr + start + o_r, mask=m_r, other=0)
            tok = (info & INDEX_MASK).to(tl.int64)
            offs = ((i_b.to(tl.int64) * S + tok) * H + i_h)[:, None] * D + o_d[None, :]
            b_q = tl.load(q_ptr + offs, mask=m_r[:, None], other=0.0)  # [BM, D]
            b_do = tl.load(do_ptr + offs, mask=m_r[:, None], other=0.0)  # [BM, D]
            p_row = i_bh.to(tl.int64) * S + tok
            b_lse = tl.load(lse_ptr + p_row, mask=m_r, other=0.0)
            b_delta = tl.load(delta_ptr + p_row, mask=m_r, other=0.0)
            # transposed scores: keys are the rows here
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BN, BM]
            b_pt = tl.math.exp2(b_st * qk_scale - b_lse[None, :])
            b_pt = tl.where(m_n[:, None] & m_r[None, :], b_pt, 0.0)  # [BN, BM]
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)  # [BN, D]
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
            b_dst = b_pt * (b_dpt - b_delta[None, :])  # [BN, BM]
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)  # [BN, D]
            if FUSED_DQ:
                # rows past the block's end hold the next block's keys, but their dS is zero
                b_dq = tl.dot(tl.trans(b_dst).to(b_k.dtype), b_k, input_precision=PRECISION)
                tl.atomic_add(dq_ptr + offs, b_dq * sm_scale, mask=m_r[:, None], sem="relaxed")
        # each key's natural token, so dK and dV need no permutation afterwards
        tok_n = tl.load(perm_ptr + block_start + o_n, mask=m_n, other=0).to(tl.int64)
        offs_n = ((i_b.to(tl.int64) * S + tok_n) * H + i_h)[:, None] * D + o_d[None, :]
        tl.store(dk_ptr + offs_n, (b_dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=m_n[:, None])
        tl.store(dv_ptr + offs_n, b_dv.to(dv_ptr.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def vmoba_bwd_dq_kernel(
    q_ptr,
    do_ptr,
    k_desc,
    v_desc,
    dq_ptr,
    lse_ptr,
    delta_ptr,
    qlist_ptr,
    seg_start_ptr,
    seg_count_ptr,
    first_tile_ptr,
    item_seg_ptr,
    starts_ptr,
    lengths_ptr,
    H,
    S,
    BH,
    n_seg,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ contributions of every (segment, gathered query tile): the work list of an index built
    with tiles of `BM` queries (`first_tile`, `item_seg`), taken in a strided persistent loop.
    `dq [B, S, H, D]` fp32, accumulated atomically."""
    o_d = tl.arange(0, D)
    total = tl.load(first_tile_ptr + n_seg)
    for work in range(tl.program_id(0), total, tl.num_programs(0)):
        seg = tl.load(item_seg_ptr + work)
        row0 = (work - tl.load(first_tile_ptr + seg)) * BM
        count = tl.load(seg_count_ptr + seg)
        if row0 < count:
            i_c = seg // BH
            i_bh = seg % BH
            i_b = i_bh // H
            i_h = i_bh % H
            o_r = row0 + tl.arange(0, BM)
            m_r = o_r < count
            info = tl.load(qlist_ptr + tl.load(seg_start_ptr + seg) + o_r, mask=m_r, other=0)
            tok = (info & INDEX_MASK).to(tl.int64)
            offs = ((i_b.to(tl.int64) * S + tok) * H + i_h)[:, None] * D + o_d[None, :]
            b_q = tl.load(q_ptr + offs, mask=m_r[:, None], other=0.0)  # [BM, D]
            b_do = tl.load(do_ptr + offs, mask=m_r[:, None], other=0.0)  # [BM, D]
            p_row = i_bh.to(tl.int64) * S + tok
            b_lse = tl.load(lse_ptr + p_row, mask=m_r, other=0.0)
            b_delta = tl.load(delta_ptr + p_row, mask=m_r, other=0.0)
            block_start = tl.load(starts_ptr + i_c)
            block_len = tl.load(lengths_ptr + i_c)
            row = i_b * S + block_start
            b_dq = tl.zeros([BM, D], dtype=tl.float32)
            for j0 in range(0, block_len, BN):
                b_k = k_desc.load([row + j0, i_h * D])  # [BN, D]
                b_v = v_desc.load([row + j0, i_h * D])  # [BN, D]
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BN]
                b_p = tl.math.exp2(b_s * qk_scale - b_lse[:, None])
                # keys past the block's end belong to the next block
                b_p = tl.where((j0 + tl.arange(0, BN) < block_len)[None, :], b_p, 0.0)
                b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BM, BN]
                b_ds = b_p * (b_dp - b_delta[:, None])
                b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)  # [BM, D]
            tl.atomic_add(dq_ptr + offs, b_dq * sm_scale, mask=m_r[:, None], sem="relaxed")


def attend_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: Selection,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dq, dk, dv [B, S, H, D]` (dtype of `q`) of `attend(q, k, v, selection, softmax_scale)`,
    given its output `out` and the `lse [B*H, S]` it wrote. The query index is built again, with
    the dq kernel's tile size (cheaper than keeping the forward's: it is sized for every block a
    query may select). `backward_config`'s `fused_dq` picks the variant (module docstring)."""
    b, s, h, d = q.shape
    layout = selection.layout
    bh, c, dev = b * h, layout.num_blocks, q.device
    n_seg = c * bh
    q, grad_out, out = (x.contiguous() for x in (q, grad_out, out))
    precision = "ieee" if q.dtype == torch.float32 else None  # None: tl.dot's default
    qk_scale = softmax_scale * LOG2E
    cfg = backward_config(interpreting())
    qc = cfg["dq"]
    index = query_index(
        selection, qc["BM"], attention_config(d, interpreting(), 0)["compact_block"]
    )

    delta = torch.empty(bh, s, device=dev, dtype=torch.float32)
    blk = 32 if interpreting() else 64
    vmoba_bwd_delta_kernel[(triton.cdiv(s, blk), bh)](out, grad_out, delta, h, s, D=d, BLK=blk)

    kb, vb = blocked_kv(k, v, layout)
    dk = torch.empty(b, s, h, d, device=dev, dtype=k.dtype)
    dv = torch.empty(b, s, h, d, device=dev, dtype=v.dtype)
    dq32 = torch.zeros(b, s, h, d, device=dev, dtype=torch.float32)
    kv = cfg["dkdv"]
    k_desc, v_desc = (
        TensorDescriptor.from_tensor(x.view(b * s, h * d), [kv["BN"], d]) for x in (kb, vb)
    )
    vmoba_bwd_dkdv_kernel[(triton.cdiv(layout.max_len, kv["BN"]), n_seg)](
        q,
        grad_out,
        k_desc,
        v_desc,
        dk,
        dv,
        dq32,
        lse,
        delta,
        index.qlist,
        index.seg_start,
        index.seg_count,
        layout.starts,
        layout.lengths,
        layout.perm,
        h,
        s,
        bh,
        qk_scale,
        softmax_scale,
        D=d,
        BM=kv["BM"],
        BN=kv["BN"],
        PRECISION=precision,
        FUSED_DQ=cfg["fused_dq"],
        num_warps=kv["num_warps"],
        num_stages=kv["num_stages"],
    )
    if cfg["fused_dq"]:
        return dq32.to(q.dtype), dk, dv

    k_desc, v_desc = (
        TensorDescriptor.from_tensor(x.view(b * s, h * d), [qc["BN"], d]) for x in (kb, vb)
    )
    n_prog = qc["programs"] if interpreting() else qc["ctas_per_sm"] * _sm_count(dev)
    vmoba_bwd_dq_kernel[(n_prog,)](
        q,
        grad_out,
        k_desc,
        v_desc,
        dq32,
        lse,
        delta,
        index.qlist,
        index.seg_start,
        index.seg_count,
        index.first_tile,
        index.item_seg,
        layout.starts,
        layout.lengths,
        h,
        s,
        bh,
        n_seg,
        qk_scale,
        softmax_scale,
        D=d,
        BM=qc["BM"],
        BN=qc["BN"],
        PRECISION=precision,
        num_warps=qc["num_warps"],
        num_stages=qc["num_stages"],
    )
    return dq32.to(q.dtype), dk, dv
