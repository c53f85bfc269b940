"""Global selection (`threshold_global`): one cutoff over all `S*C` (query, block) pairs of a head,
found without a full sort.

Each pass scores a query tile's blocks in groups of 32 (plus a tail of 16 or 32: fewer padded
pairs than one power-of-two tile) and recomputes the gate scores instead of storing them
(storing would cost `S*C` floats per head):
- pass 1: per-tile min and max (a head's range normalises its scores to [0, 1]);
- pass 2: an NB-bin histogram of the normalised scores (plus exact sums);
- pass 3: an NB-bin histogram inside the bins that can hold the cutoff (skipped by a head whose
  first band already fits the candidate buffer);
- pass 4: the mask of every pair outside the band, and the band's pairs compacted (candidates).
A third histogram level over the candidates keeps the few near the cutoff, a one-warp kernel finds
the exact cutoff key among them, and the candidates at or above it are added to the mask. Pass 5
writes the whole mask only for a degenerate head (every gate equal) or one whose candidates
overflowed. `select_global` launches the passes in that order; no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    _attended_tokens,
    _gate_scores,
    _monotone_key,
    _query_tile,
    _selection_bits,
    interpreting,
)

# passes of `vmoba_global_pass_kernel` (its PHASE)
PHASE_MINMAX = 1  # pass 1
PHASE_HIST1 = 2  # pass 2
PHASE_HIST2 = 3  # pass 3
PHASE_COMPACT = 4  # pass 4
PHASE_MASK = 5  # pass 5

# per-head state of threshold_global, `range[bh, :RANGE_SLOTS]` fp32, by slot
RANGE_SLOTS = tl.constexpr(16)
R_LO = tl.constexpr(0)  # the head's lowest gate
R_SCALE = tl.constexpr(1)  # 1 / (highest - lowest)
R_FLAT = tl.constexpr(2)  # 1: a degenerate head (every gate equal)
R_A1, R_B1 = tl.constexpr(3), tl.constexpr(4)  # the first histogram's band that holds the cutoff
R_A2, R_B2 = tl.constexpr(5), tl.constexpr(6)  # the band compacted as candidates
R_NEED = tl.constexpr(7)  # mass of other pairs to take
R_DIRECT = tl.constexpr(8)  # 1: the first band is compacted as is (no second histogram)
# the third level's bins that can hold the cutoff
R_J_LO, R_J_HI = tl.constexpr(9), tl.constexpr(10)

# the third level: its bins over the candidates, and room for those it keeps per head (up to
# CAP / NEAR_BINS on average; more only where values crowd one bin). 512 bins: measured faster
# than 1,024 on the H200, and the near-cutoff set stays well inside its room at 64K candidates.
NEAR_BINS = 512
NEAR = 1024


@triton.jit
def _pair_keys(val, pair):
    """64-bit keys of (normalised value >= 0, block-major pair index < 2**32, int64): value bits
    high, pair order low, so sorting by key breaks ties by pair as the reference does."""
    return (val.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0xFFFFFFFF - pair)


@triton.jit
def _stored_pairs(pair):
    """Pair indices stored as int32 (their low 32 bits) back to int64."""
    return pair.to(tl.uint32).to(tl.int64)


@triton.jit
def _without_left_out(hist, n_out, NB: tl.constexpr):
    """A histogram `[NB]` whose `n_out` left-out elements were counted into bin 0, without them.

    Used instead of `tl.histogram(mask=...)`, whose mask Triton 3.6 applied to the wrong elements
    on an H200 when its layout differed from the input's (counts right, bins wrong). A junk bin
    `NB` of a `2*NB`-bin histogram also works, but doubles the histogram's cost.
    """
    return hist - tl.where(tl.arange(0, NB) == 0, n_out, 0)


@triton.jit
def _histogram(b_bin, b_keep, N: tl.constexpr, NB: tl.constexpr):
    """Counts `[NB]` of the `N` elements `b_bin` over the kept ones."""
    hist = tl.histogram(tl.reshape(tl.where(b_keep, b_bin, 0), [N]), NB)
    return _without_left_out(hist, N - tl.sum(tl.sum(b_keep.to(tl.int32), axis=1), axis=0), NB)


@triton.jit
def _store_word(
    mask_ptr, lengths_ptr, b_sel, i_bh, o_i, m_i, S, C, c0, CW: tl.constexpr, W: tl.constexpr
):
    """Write the selection of the blocks `[c0, c0 + CW)` (CW <= 32: one bit word a query); return
    the tokens they attend."""
    o_c = c0 + tl.arange(0, CW)
    word = tl.sum(_selection_bits(b_sel, o_c), axis=1)  # [BM]
    tl.store(mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W + c0 // 32, word, mask=m_i)
    return _attended_tokens(lengths_ptr, b_sel, m_i, o_c, C)


@triton.jit
def _global_columns(
    b_q,
    km_hi_ptr,
    km_lo_ptr,
    lengths_ptr,
    mask_ptr,
    range_ptr,
    cand_val_ptr,
    cand_pair_ptr,
    cand_n_ptr,
    cutoff_ptr,
    geo_ptr,
    i_bh,
    o_i,
    m_i,
    self_c,
    S,
    C,
    CAP,
    m_take,
    c0,
    CW: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    NB: tl.constexpr,
    W: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    KIND: tl.constexpr,
):
    """threshold_global's pass PHASE over the blocks `[c0, c0 + CW)` of a query tile.

    Returns `(s0, s1, attended, hist)`: pass 1 min and max; pass 2 total and self mass and the
    histogram; pass 3 the mass at or above the band and the histogram; pass 4 that mass and the
    attended tokens; pass 5 the attended tokens (zeros where a pass has nothing to return).
    """
    BM: tl.constexpr = b_q.shape[0]
    o_c = c0 + tl.arange(0, CW)
    b_g = _gate_scores(b_q, km_hi_ptr, km_lo_ptr, i_bh, c0, CW, C_PAD, D, SPLIT, IEEE)
    is_self = o_c[None, :] == self_c[:, None]  # [BM, CW]
    valid = m_i[:, None] & (o_c < C)[None, :]
    other = valid & ~is_self
    s0 = tl.full([], 0.0, tl.float32)
    s1 = s0
    attended = s0
    hist = tl.zeros([NB], dtype=tl.int32)
    if PHASE == 1:
        s0 = tl.min(tl.min(tl.where(valid, b_g, float("inf")), axis=1), axis=0)
        s1 = tl.max(tl.max(tl.where(valid, b_g, -float("inf")), axis=1), axis=0)
    else:
        p_r = range_ptr + i_bh * RANGE_SLOTS
        flat = tl.load(p_r + R_FLAT)
        b_n = tl.where(flat > 0, 1.0, (b_g - tl.load(p_r + R_LO)) * tl.load(p_r + R_SCALE))
        if PHASE == 2:
            # pass 2: histogram of the other pairs over [0, 1]; exact total and self mass
            b_bin = tl.maximum(tl.minimum((b_n * NB).to(tl.int32), NB - 1), 0)
            hist = _histogram(b_bin, other, BM * CW, NB)
            s0 = tl.sum(tl.sum(tl.where(valid, b_n, 0.0), axis=1), axis=0)
            s1 = tl.sum(tl.sum(tl.where(valid & is_self, b_n, 0.0), axis=1), axis=0)
        elif PHASE == 3:
            # pass 3: histogram inside [a1, b1); exact mass of the pairs at or above b1
            a1 = tl.load(p_r + R_A1)
            b1 = tl.load(p_r + R_B1)
            inside = other & (b_n >= a1) & (b_n < b1)
            b_bin = ((b_n - a1) * (NB / (b1 - a1))).to(tl.int32)
            hist = _histogram(tl.maximum(tl.minimum(b_bin, NB - 1), 0), inside, BM * CW, NB)
            s0 = tl.sum(tl.sum(tl.where(other & (b_n >= b1), b_n, 0.0), axis=1), axis=0)
        else:
            # block-major pair index (< 2**32)
            o_pair = o_c[None, :].to(tl.int64) * S + o_i[:, None]
            if PHASE == 4:
                # pass 4: compact the pairs in [a2, b2); exact mass at or above b2; the mask of every
                # pair but those (a degenerate head's mask is rewritten by pass 5)
                a2 = tl.load(p_r + R_A2)
                b2 = tl.load(p_r + R_B2)
                s0 = tl.sum(tl.sum(tl.where(other & (b_n >= b2), b_n, 0.0), axis=1), axis=0)
                inside = other & (b_n >= a2) & (b_n < b2)
                if flat == 0:  # noqa: SIM102  (Triton kernel: `and` would not short-circuit the tile sum)
                    # most tiles hold a few
                    if tl.sum(tl.sum(inside.to(tl.int32), axis=1), axis=0) > 0:
                        # a slot per pair from one counter per head (cheaper than a scan of the tile)
                        slot = tl.atomic_add(
                            cand_n_ptr + i_bh + tl.zeros([BM, CW], dtype=tl.int32),
                            1,
                            mask=inside,
                            sem="relaxed",
                        )
                        keep = inside & (slot < CAP)
                        p_c = i_bh.to(tl.int64) * CAP + slot
                        tl.store(cand_val_ptr + p_c, b_n, mask=keep)
                        # the low 32 bits
                        tl.store(cand_pair_ptr + p_c, o_pair.to(tl.int32), mask=keep)
                # pairs of the band are added later
                b_sel = valid & (is_self | (other & (b_n >= b2)))
                attended = _store_word(
                    mask_ptr, lengths_ptr, b_sel, i_bh, o_i, m_i, S, C, c0, CW, W
                )
            else:
                # pass 5: the whole mask (a degenerate head ranks pairs by (block, query) alone)
                if flat > 0:
                    b_sel = is_self | (
                        other & (_degenerate_rank(geo_ptr, o_i, o_c, S, KIND) < m_take)
                    )
                else:
                    b_sel = is_self | (
                        other & (_pair_keys(b_n, o_pair) >= tl.load(cutoff_ptr + i_bh))
                    )
                attended = _store_word(
                    mask_ptr, lengths_ptr, b_sel & valid, i_bh, o_i, m_i, S, C, c0, CW, W
                )
    return s0, s1, attended, hist


@triton.jit
def _no_columns(NB: tl.constexpr, PHASE: tl.constexpr):
    """The partials of no blocks: `_global_columns`'s results before the first group."""
    zero = tl.full([], 0.0, tl.float32)
    hist = tl.zeros([NB], dtype=tl.int32)
    if PHASE == 1:
        return zero + float("inf"), zero - float("inf"), zero, hist
    return zero, zero, zero, hist


@triton.jit
def _combine(s0, s1, attended, hist, r0, r1, r_att, r_hist, PHASE: tl.constexpr):
    """Add one column group's partials to a tile's."""
    if PHASE == 1:
        return tl.minimum(s0, r0), tl.maximum(s1, r1), attended, hist
    return s0 + r0, s1 + r1, attended + r_att, hist + r_hist


@triton.jit
def vmoba_global_pass_kernel(
    q_ptr,
    km_hi_ptr,
    km_lo_ptr,
    ids_ptr,
    lengths_ptr,
    mask_ptr,
    att_ptr,  # outputs of the mask-writing passes (4 and 5)
    stats_ptr,  # [BH, n_tiles, 4] fp32 partials (min/max, or sums)
    range_ptr,  # [BH, RANGE_SLOTS] fp32
    hist_ptr,  # [BH, NB] int32
    cand_val_ptr,
    cand_pair_ptr,
    cand_n_ptr,  # candidates [BH, CAP]: value fp32, pair int32; count [BH]
    cutoff_ptr,  # cutoff key [BH] int64
    geo_ptr,  # int32 [9]: T, Hg, Wg, ct, ch, cw, nT, nH, nW (effective chunks of the kind)
    stride_qb,
    stride_qs,
    stride_qh,
    H,
    S,
    C,
    n_tiles,
    CAP,
    m_take,
    BM: tl.constexpr,
    C_PAD: tl.constexpr,
    D: tl.constexpr,
    NB: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    KIND: tl.constexpr,
    GROUPS: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Pass PHASE (1-5) of threshold_global over one query tile of one head.

    The blocks are scored in `GROUPS` groups of 32 and one of `TAIL` (0, 16 or 32), a mask word
    each: C = 40 pads to 48 instead of 64, and these passes cost in proportion to the pairs they
    touch.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    if PHASE == 3:  # noqa: SIM102  (Triton kernel: constexpr guard, the load only in PHASE 3)
        if tl.load(range_ptr + i_bh * RANGE_SLOTS + R_DIRECT) > 0:
            return  # the head's first band is compacted as is
    if PHASE == 5:
        found = tl.load(cand_n_ptr + i_bh)
        # both loads in flight at once
        degenerate = tl.load(range_ptr + i_bh * RANGE_SLOTS + R_FLAT)
        if (found <= CAP) & (degenerate == 0):
            return  # pass 4 and the patch wrote the mask
    i_b, i_h = i_bh // H, i_bh % H
    o_i = i_t * BM + tl.arange(0, BM)
    m_i = o_i < S
    b_q = _query_tile(q_ptr, i_b, i_h, o_i, m_i, stride_qb, stride_qs, stride_qh, D)
    self_c = tl.load(ids_ptr + o_i, mask=m_i, other=0).to(tl.int32)

    W: tl.constexpr = C_PAD // 32
    N_GROUPS: tl.constexpr = GROUPS + (TAIL > 0)  # one mask word each
    s0, s1, attended, hist = _no_columns(NB, PHASE)
    for g in tl.static_range(N_GROUPS):
        r0, r1, r_att, r_hist = _global_columns(
            b_q,
            km_hi_ptr,
            km_lo_ptr,
            lengths_ptr,
            mask_ptr,
            range_ptr,
            cand_val_ptr,
            cand_pair_ptr,
            cand_n_ptr,
            cutoff_ptr,
            geo_ptr,
            i_bh,
            o_i,
            m_i,
            self_c,
            S,
            C,
            CAP,
            m_take,
            g * 32,
            32 if g < GROUPS else TAIL,
            C_PAD,
            D,
            NB,
            W,
            PHASE,
            SPLIT,
            IEEE,
            KIND,
        )
        s0, s1, attended, hist = _combine(s0, s1, attended, hist, r0, r1, r_att, r_hist, PHASE)
    p_s = stats_ptr + (i_bh * n_tiles + i_t) * 4
    if PHASE <= 4:
        tl.store(p_s + 0, s0)
    if PHASE <= 2:
        tl.store(p_s + 1, s1)
    if PHASE == 2 or PHASE == 3:
        # only the bins this tile hit: a tile's pairs fall in few of them, and every program of
        # the head adds into the same NB counters
        tl.atomic_add(hist_ptr + i_bh * NB + tl.arange(0, NB), hist, mask=hist > 0)
    if PHASE >= 4:
        tl.store(att_ptr + i_bh * n_tiles + i_t, attended)
        for w in tl.static_range(N_GROUPS, W):  # words past the last block
            tl.store(
                mask_ptr + (i_bh.to(tl.int64) * S + o_i) * W + w,
                tl.zeros([BM], dtype=tl.int32),
                mask=m_i,
            )


@triton.jit
def _count_before(x, x0, chunk, n):
    """How many of the positions `[x0, x0 + chunk)`, clipped to `n`, lie below `x`."""
    return tl.minimum(tl.maximum(x - x0, 0), tl.minimum(chunk, n - x0))


@triton.jit
def _degenerate_rank(geo_ptr, o_i, o_c, S, KIND: tl.constexpr):
    """Rank of each other pair `(i, c)` in (block, query) order, self pairs skipped.

    rank = c*S + i - (tokens of blocks < c) - (tokens of block c before i), in closed form from
    the grid and chunk sizes (used only when every normalised gate of a head is equal).
    """
    T = tl.load(geo_ptr + 0)
    HG = tl.load(geo_ptr + 1)
    WG = tl.load(geo_ptr + 2)
    CT = tl.load(geo_ptr + 3)
    CH = tl.load(geo_ptr + 4)
    CW = tl.load(geo_ptr + 5)
    NH = tl.load(geo_ptr + 7)
    NW = tl.load(geo_ptr + 8)
    i = o_i[:, None].to(tl.int64)
    c = o_c[None, :].to(tl.int64)
    t_i = i // (HG * WG)
    h_i = (i // WG) % HG
    w_i = i % WG
    # block c's extent
    if KIND == 1:
        ct_c = c
        ch_c = c * 0
        cw_c = c * 0
    elif KIND == 2:
        ct_c = c * 0
        ch_c = c // NW
        cw_c = c % NW
    else:
        ct_c = c // (NH * NW)
        ch_c = (c // NW) % NH
        cw_c = c % NW
    t0 = ct_c * CT
    h0 = ch_c * CH
    w0 = cw_c * CW
    lt = tl.minimum(CT, T - t0)
    lh = tl.minimum(CH, HG - h0)
    lw = tl.minimum(CW, WG - w0)
    # tokens of block c with a smaller raster index than i
    in_t = (t_i >= t0) & (t_i < t0 + lt)
    in_h = (h_i >= h0) & (h_i < h0 + lh)
    before = _count_before(t_i, t0, CT, T) * lh * lw
    before += tl.where(in_t, _count_before(h_i, h0, CH, HG) * lw, 0)
    before += tl.where(in_t & in_h, _count_before(w_i, w0, CW, WG), 0)
    # tokens of all blocks below c: a prefix sum over the partition, in closed form
    if KIND == 1:
        below = t0 * HG * WG
    else:
        full_rows = ch_c * CH  # spatial rows above the tile row
        rows_h = tl.minimum(CH, HG - h0)
        below_plane = full_rows * WG + rows_h * w0  # tiles before (ch_c, cw_c) in one plane
        if KIND == 2:  # noqa: SIM108  (Triton kernel: constexpr branch, kept as the kernel reads)
            below = below_plane * T
        else:
            below = t0 * HG * WG + below_plane * lt
    return c * S + i - below - before


@triton.jit
def vmoba_range_kernel(stats_ptr, range_ptr, n_tiles, NT_PAD: tl.constexpr):
    """Per head: `lo`, `1 / span` and the degenerate flag from pass 1's per-tile min/max."""
    i_bh = tl.program_id(0)
    p_r = range_ptr + i_bh * RANGE_SLOTS
    o_t = tl.arange(0, NT_PAD)
    m_t = o_t < n_tiles
    p_s = stats_ptr + (i_bh * n_tiles + o_t) * 4
    lo = tl.min(tl.load(p_s + 0, mask=m_t, other=float("inf")), axis=0)
    hi = tl.max(tl.load(p_s + 1, mask=m_t, other=-float("inf")), axis=0)
    span = hi - lo
    flat = span <= 1e-6 * tl.maximum(tl.abs(hi), tl.abs(lo))
    tl.store(p_r + R_LO, lo)
    tl.store(p_r + R_SCALE, 1.0 / tl.where(flat, 1.0, span))  # every pass multiplies by it
    tl.store(p_r + R_FLAT, flat.to(tl.float32))


@triton.jit
def _cutoff_bins(cnt_i, a, b, need, NB: tl.constexpr):
    """The bins `[j_lo, j_hi]` of a histogram over `[a, b)` (counts `cnt_i [NB]`) that can hold the
    cutoff: the mass at or above it must reach `need`. Bin j covers `[a + j*w, a + (j+1)*w)`, so
    the mass of the bins from j up lies between two bounds."""
    o_j = tl.arange(0, NB)
    w = (b - a) / NB
    cnt = cnt_i.to(tl.float32)
    low = cnt * (a + o_j * w)
    up = cnt * (a + (o_j + 1) * w)
    # suffix sums via a reversed cumulative sum
    suf_low = tl.sum(low, axis=0) - tl.cumsum(low, axis=0) + low
    suf_up = tl.sum(up, axis=0) - tl.cumsum(up, axis=0) + up
    j_hi = tl.max(tl.where(suf_up >= need, o_j, 0), axis=0)
    j_lo = tl.max(tl.where(suf_low >= need, o_j, 0), axis=0)
    return j_lo, j_hi, w


@triton.jit
def vmoba_decide_kernel(
    hist_ptr,
    stats_ptr,
    range_ptr,
    n_tiles,
    tau,
    direct_max,
    STEP: tl.constexpr,
    NB: tl.constexpr,
    NT_PAD: tl.constexpr,
):
    """Per head: narrow the cutoff range from pass 2's histogram (STEP 1), pass 3's (STEP 2) or the
    candidates' (STEP 3: the bins j3 of [a2, b2) that can hold the cutoff).

    `need` is the mass of other pairs still to take (`tau * total - self`), in normalised units.
    STEP 1 marks the head direct when its first band holds at most `direct_max` pairs: the band is
    then compacted as is (a2, b2 = a1, b1) and STEP 2 leaves the head alone.
    """
    i_bh = tl.program_id(0)
    p_r = range_ptr + i_bh * RANGE_SLOTS
    o_t = tl.arange(0, NT_PAD)
    m_t = o_t < n_tiles
    p_s = stats_ptr + (i_bh * n_tiles + o_t) * 4
    # partial sums are added in fp64: a head has millions of pairs
    if STEP == 1:
        tot = tl.sum(tl.load(p_s + 0, mask=m_t, other=0.0).to(tl.float64), axis=0)
        slf = tl.sum(tl.load(p_s + 1, mask=m_t, other=0.0).to(tl.float64), axis=0)
        need = (tau * tot - slf).to(tl.float32)
        tl.store(p_r + R_NEED, need)  # mass of other pairs to take, fixed from here on
        a = 0.0
        b = 1.0
    else:
        above = tl.sum(tl.load(p_s + 0, mask=m_t, other=0.0).to(tl.float64), axis=0)
        need = (tl.load(p_r + R_NEED).to(tl.float64) - above).to(tl.float32)
        a = tl.load(p_r + R_A1 if STEP == 2 else p_r + R_A2)
        b = tl.load(p_r + R_B1 if STEP == 2 else p_r + R_B2)
        direct = tl.load(p_r + R_DIRECT) > 0
    o_j = tl.arange(0, NB)
    cnt_i = tl.load(hist_ptr + i_bh * NB + o_j)
    j_lo, j_hi, w = _cutoff_bins(cnt_i, a, b, need, NB)
    band_lo = a + j_lo * w
    if STEP == 1:
        band_hi = tl.where(j_hi == NB - 1, 2.0, a + (j_hi + 1) * w)
        band_n = tl.sum(tl.where((o_j >= j_lo) & (o_j <= j_hi), cnt_i, 0), axis=0)
        direct = band_n <= direct_max
        tl.store(p_r + R_A1, band_lo)
        tl.store(p_r + R_B1, band_hi)
        tl.store(p_r + R_DIRECT, direct.to(tl.float32))
        # the band pass 4 compacts; STEP 2 narrows it unless the head is direct
        tl.store(p_r + R_A2, band_lo)
        tl.store(p_r + R_B2, band_hi)
    elif STEP == 2:
        band_hi = tl.where(j_hi == NB - 1, b, a + (j_hi + 1) * w)
        tl.store(p_r + R_A2, band_lo, mask=~direct)
        tl.store(p_r + R_B2, band_hi, mask=~direct)
    else:
        tl.store(p_r + R_J_LO, j_lo.to(tl.float32))
        tl.store(p_r + R_J_HI, j_hi.to(tl.float32))


@triton.jit
def _candidate_bins(val, a, b, NB: tl.constexpr):
    """Bins over `[a, b)` of candidate values."""
    return tl.maximum(tl.minimum(((val - a) * (NB / (b - a))).to(tl.int32), NB - 1), 0)


@triton.jit
def _candidate_chunk(cand_n_ptr, i_bh, i_k, CAP, CHUNK: tl.constexpr):
    """Slots of chunk `i_k` of a head's candidates, which of them hold one, and how many it has."""
    count = tl.minimum(tl.load(cand_n_ptr + i_bh), CAP)
    o_k = i_k * CHUNK + tl.arange(0, CHUNK)
    return o_k, o_k < count, count


@triton.jit
def vmoba_band_hist_kernel(
    range_ptr, cand_val_ptr, cand_n_ptr, hist_ptr, CAP, NB: tl.constexpr, CHUNK: tl.constexpr
):
    """Level 3: histogram over [a2, b2) of one chunk of a head's candidates."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    o_k, m_k, count = _candidate_chunk(cand_n_ptr, i_bh, i_k, CAP, CHUNK)
    if i_k * CHUNK >= count:
        return  # past the head's candidates
    p_r = range_ptr + i_bh * RANGE_SLOTS
    val = tl.load(cand_val_ptr + i_bh.to(tl.int64) * CAP + o_k, mask=m_k, other=0.0)
    bins = _candidate_bins(val, tl.load(p_r + R_A2), tl.load(p_r + R_B2), NB)
    hist = tl.histogram(tl.where(m_k, bins, 0), NB)
    hist = _without_left_out(hist, CHUNK - tl.sum(m_k.to(tl.int32), axis=0), NB)
    tl.atomic_add(hist_ptr + i_bh * NB + tl.arange(0, NB), hist, mask=hist > 0)


@triton.jit
def vmoba_near_kernel(
    range_ptr,
    cand_val_ptr,
    cand_pair_ptr,
    cand_n_ptr,
    near_ptr,
    near_n_ptr,
    near_min_ptr,
    above_ptr,
    CAP,
    NB: tl.constexpr,
    CHUNK: tl.constexpr,
    NEAR: tl.constexpr,
):
    """Level 3: the candidates of one chunk in bins [j_lo, j_hi] go to `near` (their keys), the
    mass of those above is added to `above` (fp64: sums of values this close are exact, so the
    order of the additions does not matter)."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    o_k, m_k, count = _candidate_chunk(cand_n_ptr, i_bh, i_k, CAP, CHUNK)
    if i_k * CHUNK >= count:
        return  # past the head's candidates
    p_r = range_ptr + i_bh * RANGE_SLOTS
    base = i_bh.to(tl.int64) * CAP
    val = tl.load(cand_val_ptr + base + o_k, mask=m_k, other=0.0)
    bins = _candidate_bins(val, tl.load(p_r + R_A2), tl.load(p_r + R_B2), NB)
    j_lo = tl.load(p_r + R_J_LO).to(tl.int32)
    j_hi = tl.load(p_r + R_J_HI).to(tl.int32)
    inside = m_k & (bins >= j_lo) & (bins <= j_hi)
    tl.atomic_add(
        above_ptr + i_bh, tl.sum(tl.where(m_k & (bins > j_hi), val.to(tl.float64), 0.0), axis=0)
    )
    if tl.sum(inside.to(tl.int32), axis=0) > 0:
        key = _pair_keys(val, _stored_pairs(tl.load(cand_pair_ptr + base + o_k, mask=m_k, other=0)))
        slot = tl.atomic_add(
            near_n_ptr + i_bh + tl.zeros([CHUNK], dtype=tl.int32), 1, mask=inside, sem="relaxed"
        )
        tl.store(near_ptr + i_bh.to(tl.int64) * NEAR + slot, key, mask=inside & (slot < NEAR))
        tl.atomic_min(
            near_min_ptr + i_bh, tl.min(tl.where(inside, key, 9223372036854775807), axis=0)
        )


@triton.jit
def vmoba_cutoff_kernel(
    stats_ptr,
    range_ptr,
    cand_n_ptr,
    near_ptr,
    near_n_ptr,
    near_min_ptr,
    above_ptr,
    cutoff_ptr,
    n_tiles,
    CAP,
    NT_PAD: tl.constexpr,
    NEAR: tl.constexpr,
):
    """Per head: the exact cutoff key from the candidates kept near it: the largest key whose
    "take every pair at or above it" reaches the mass still needed, by bisection over the 64-bit
    keys (value high, pair order low: ties are exact; fp64 sums: exact, in any order).
    Fallbacks take a superset: the whole band if the candidates overflowed (or none were found),
    the whole third-level band if it overflowed; nothing beyond self pairs if nothing is needed.
    """
    i_bh = tl.program_id(0)
    p_r = range_ptr + i_bh * RANGE_SLOTS
    o_t = tl.arange(0, NT_PAD)
    above = tl.sum(
        tl.load(stats_ptr + (i_bh * n_tiles + o_t) * 4, mask=o_t < n_tiles, other=0.0).to(
            tl.float64
        ),
        axis=0,
    )
    need = tl.load(p_r + R_NEED).to(tl.float64) - above  # the mass still to take beyond the band
    nothing_needed = need <= 0
    need -= tl.load(above_ptr + i_bh)  # ... and beyond the near candidates
    n_near = tl.load(near_n_ptr + i_bh)
    o_n = tl.arange(0, NEAR)
    m_n = o_n < tl.minimum(n_near, NEAR)
    key = tl.load(near_ptr + i_bh.to(tl.int64) * NEAR + o_n, mask=m_n, other=0)
    val = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)
    lo_k = tl.min(tl.where(m_n, key, 9223372036854775807), axis=0)
    hi_k = tl.max(tl.where(m_n, key, 0), axis=0) + 1
    while hi_k - lo_k > 1:  # log2 of the keys' spread: about 40 steps, not 64
        mid = lo_k + (hi_k - lo_k) // 2
        ok = tl.sum(tl.where(m_n & (key >= mid), val, 0.0), axis=0) >= need
        lo_k = tl.where(ok, mid, lo_k)
        hi_k = tl.where(ok, hi_k, mid)
    # lo_k: the cutoff (or the lowest near key, if even all fall short)
    cut = tl.where(n_near > NEAR, tl.load(near_min_ptr + i_bh), lo_k)
    found = tl.load(cand_n_ptr + i_bh)
    band_floor = _monotone_key(tl.load(p_r + R_A2)).to(tl.int64) << 32  # every pair of the band
    cut = tl.where((found > CAP) | (found <= 0) | (n_near <= 0), band_floor, cut)
    cut = tl.where(nothing_needed, 9223372036854775807, cut)
    tl.store(cutoff_ptr + i_bh, cut)


@triton.jit
def vmoba_patch_kernel(
    cand_val_ptr,
    cand_pair_ptr,
    cand_n_ptr,
    cutoff_ptr,
    lengths_ptr,
    mask_ptr,
    att_ptr,
    S,
    n_tiles,
    CAP,
    BM: tl.constexpr,
    W: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Add the candidates at or above the cutoff to the mask pass 4 wrote, and their blocks' tokens
    to their tiles' attended counts (integer sums: exact in fp32 below 2**24, whatever the order)."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    o_k, m_k, count = _candidate_chunk(cand_n_ptr, i_bh, i_k, CAP, CHUNK)
    if i_k * CHUNK >= count:
        return  # past the head's candidates
    base = i_bh.to(tl.int64) * CAP
    val = tl.load(cand_val_ptr + base + o_k, mask=m_k, other=0.0)
    pair = _stored_pairs(tl.load(cand_pair_ptr + base + o_k, mask=m_k, other=0))
    take = m_k & (_pair_keys(val, pair) >= tl.load(cutoff_ptr + i_bh))
    c = (pair // S).to(tl.int32)
    i = pair % S
    tl.atomic_or(
        mask_ptr + (i_bh.to(tl.int64) * S + i) * W + c // 32,
        1 << (c % 32),
        mask=take,
        sem="relaxed",
    )
    b_len = tl.load(lengths_ptr + c, mask=take, other=0).to(tl.float32)
    tl.atomic_add(
        att_ptr + i_bh * n_tiles + (i // BM).to(tl.int32), b_len, mask=take, sem="relaxed"
    )


def column_groups(num_blocks: int) -> tuple[int, int]:
    """The passes score blocks in groups of 32 plus a tail of 16 or 32 (a matmul's smallest width
    is 16): `(groups of 32, tail width or 0)`. C = 40 -> (1, 16)."""
    full, rest = divmod(num_blocks, 32)
    return full, (0 if rest == 0 else max(16, triton.next_power_of_2(rest)))


def select_global(
    q, hi, lo, split: bool, layout, bits, attended, cfg: dict, *, tau: float, kind: str
) -> None:
    """Launch threshold_global's passes: fills `bits [B, H, S, W]` and `attended [B*H, n_tiles]`.

    `hi, lo, split`: the gate operands (`selection.gate_operands`); `cfg`: `gate_config`'s.
    `0 < tau < 1` (the caller turns the limits into top-k).
    """
    b, s, h, d = q.shape
    c = layout.num_blocks
    c_pad = hi.shape[1]
    bm = cfg["BM"]
    n_tiles = attended.shape[1]
    bh = b * h
    dev = q.device
    cap = cfg["CAP"]
    stats = torch.empty(bh, n_tiles, 4, device=dev, dtype=torch.float32)
    ranges = torch.zeros(bh, RANGE_SLOTS.value, device=dev, dtype=torch.float32)
    nb = cfg["bins"]
    hist = torch.zeros(bh, nb, device=dev, dtype=torch.int32)
    cand_val = torch.empty(bh, cap, device=dev, dtype=torch.float32)
    cand_pair = torch.empty(bh, cap, device=dev, dtype=torch.int32)
    cand_n = torch.zeros(bh, device=dev, dtype=torch.int32)
    cutoff = torch.empty(bh, device=dev, dtype=torch.int64)
    # pairs to take when every gate of a head is equal
    m_take = min(max(math.ceil(tau * s * c - s), 0), s * (c - 1))
    kind_id = {"1d": 1, "2d": 2, "3d": 3}[kind]
    groups, tail = column_groups(c)

    def gate_pass(phase: int):
        vmoba_global_pass_kernel[(n_tiles, bh)](
            q,
            hi,
            lo,
            layout.ids,
            layout.lengths,
            bits,
            attended,
            stats,
            ranges,
            hist,
            cand_val,
            cand_pair,
            cand_n,
            cutoff,
            layout.geometry,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            h,
            s,
            c,
            n_tiles,
            cap,
            m_take,
            BM=bm,
            C_PAD=c_pad,
            D=d,
            NB=nb,
            PHASE=phase,
            SPLIT=split,
            IEEE=q.dtype == torch.float32,
            KIND=kind_id,
            GROUPS=groups,
            TAIL=tail,
            num_warps=cfg["num_warps"],
        )

    nt_pad = triton.next_power_of_2(n_tiles)

    def decide(step: int, counts=hist):
        vmoba_decide_kernel[(bh,)](
            counts,
            stats,
            ranges,
            n_tiles,
            float(tau),
            cap if cfg["direct"] else -1,
            STEP=step,
            NB=counts.shape[-1],
            NT_PAD=nt_pad,
            num_warps=4,
        )

    gate_pass(PHASE_MINMAX)
    vmoba_range_kernel[(bh,)](stats, ranges, n_tiles, NT_PAD=nt_pad)
    gate_pass(PHASE_HIST1)
    decide(1)
    hist.zero_()
    gate_pass(PHASE_HIST2)  # skipped by heads whose first band fits the candidates
    decide(2)
    gate_pass(PHASE_COMPACT)  # the mask outside the band; the band's pairs as candidates
    # level 3 over the candidates, in chunks, then the exact cutoff among the few near it
    chunk = 1024 if not interpreting() else 64
    chunks = (triton.cdiv(cap, chunk), bh)
    hist3 = torch.zeros(bh, NEAR_BINS, device=dev, dtype=torch.int32)
    vmoba_band_hist_kernel[chunks](ranges, cand_val, cand_n, hist3, cap, NB=NEAR_BINS, CHUNK=chunk)
    decide(3, hist3)
    near = _near_buffers(bh, dev)
    vmoba_near_kernel[chunks](
        ranges, cand_val, cand_pair, cand_n, *near, cap, NB=NEAR_BINS, CHUNK=chunk, NEAR=NEAR
    )
    vmoba_cutoff_kernel[(bh,)](
        stats, ranges, cand_n, *near, cutoff, n_tiles, cap, NT_PAD=nt_pad, NEAR=NEAR, num_warps=1
    )
    vmoba_patch_kernel[chunks](
        cand_val,
        cand_pair,
        cand_n,
        cutoff,
        layout.lengths,
        bits,
        attended,
        s,
        n_tiles,
        cap,
        BM=bm,
        W=c_pad // 32,
        CHUNK=chunk,
    )
    gate_pass(PHASE_MASK)  # only degenerate heads and those whose candidates overflowed


def _near_buffers(bh: int, dev):
    """The third level's state per head: near-cutoff keys, their count, the lowest of them, and
    the mass of the candidates above them."""
    return (
        torch.empty(bh, NEAR, device=dev, dtype=torch.int64),
        torch.zeros(bh, device=dev, dtype=torch.int32),
        torch.full((bh,), torch.iinfo(torch.int64).max, device=dev, dtype=torch.int64),
        torch.zeros(bh, device=dev, dtype=torch.float64),
    )
