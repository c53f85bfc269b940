"""Host side of the Triton path: buffers, launch order and grids. No host synchronisation.

`select_bits` runs pooling, gating and selection and returns the selection as a bitmask;
`sparse_attention` adds the query index and the attention launch. Both work on CUDA and, for tests,
under the Triton CPU interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ..config import VMoBAConfig
from ..partition import BlockLayout, block_layout
from . import attention as attn_k
from . import gate as gate_k
from .configs import attention_config, gate_config, pool_config

LOG2E = 1.4426950408889634
TOPK_ITER_MAX = 16  # top-k picks per query up to which repeated max beats bisection
MAX_BLOCKS = 1024  # C_PAD <= 1024: each query's scores are sorted in registers
# threshold_global's third level: its bins over the candidates (H200: the histogram over 21-56K of
# them took 21 us with 1,024 bins, 6 us with 256), and room for those it keeps per head (up to
# CAP / NEAR_BINS on average; more only where values crowd one bin)
NEAR_BINS = 512
NEAR = 1024


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_supported(q: torch.Tensor, num_blocks: int) -> None:
    if not (q.is_cuda or interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='reference'")
    allowed = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.float32)
    if q.dtype not in allowed:
        raise ValueError(f"backend='triton' supports {allowed} on {q.device.type}, got {q.dtype}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256) or (q.is_cuda and d not in (64, 128)):
        raise ValueError(f"backend='triton' supports head dim D in (64, 128), got {d}")
    if num_blocks > MAX_BLOCKS:
        raise ValueError(f"backend='triton' supports at most {MAX_BLOCKS} blocks per layer, got {num_blocks}; "
                         "use larger chunks")
    if q.shape[1] * num_blocks >= 2**32 or q.shape[1] >= 2**29:
        raise ValueError(f"too many tokens for the triton backend: S={q.shape[1]}")


@dataclass
class Selection:
    """A selection as the kernels use it.

    - `bits`: `[B, H, S, W]` int32, bit `c % 32` of word `c // 32` set for a selected block.
    - `attended`: `[B*H, n_tiles]` fp32 per-tile sums of `|K(b,h,i)|` (tokens attended).
    - `max_blocks_per_query`: sizes the query index without reading the selection.
    """

    bits: torch.Tensor
    attended: torch.Tensor
    layout: BlockLayout
    max_blocks_per_query: int  # a bound known on the host: top-k's k, else every block

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def to_bool(self) -> torch.Tensor:
        """`[B, H, S, C]` bool."""
        shifts = torch.arange(32, device=self.bits.device, dtype=torch.int32)
        bits = (self.bits.unsqueeze(-1) >> shifts) & 1
        return bits.flatten(-2)[..., : self.num_blocks].bool()

    def density(self) -> torch.Tensor:
        """Fraction of the `S x S` scores computed, as a 0-dim fp64 device tensor (no sync)."""
        b, h, s, _ = self.bits.shape
        return self.attended.double().sum() / (b * h * s * s)


def _pad_blocks(num_blocks: int) -> int:
    return max(32, triton.next_power_of_2(num_blocks))


def block_means(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block, `[B*H, C, D]` fp32, deterministic (fixed-split partial sums)."""
    b, s, h, d = k.shape
    cfg = pool_config(interpreting())
    split_len = cfg["split"]
    n_split = max(1, math.ceil(layout.max_len / split_len))
    partial = torch.empty(b * h, layout.num_blocks, n_split, d, device=k.device, dtype=torch.float32)
    gate_k.vmoba_pool_kernel[(b * h, layout.num_blocks, n_split)](
        k, layout.perm, layout.starts, layout.lengths, partial,
        k.stride(0), k.stride(1), k.stride(2),
        h, layout.num_blocks, split_len,
        D=d, BT=cfg["BT"], num_warps=cfg["num_warps"],
    )
    return partial.sum(2) / layout.lengths.to(torch.float32)[None, :, None]


def column_groups(num_blocks: int) -> tuple[int, int]:
    """threshold_global's passes score blocks in groups of 32 plus a tail of 16 or 32 (a matmul's
    smallest width is 16): `(groups of 32, tail width or 0)`. C = 40 -> (1, 16)."""
    full, rest = divmod(num_blocks, 32)
    return full, (0 if rest == 0 else max(16, triton.next_power_of_2(rest)))


def gate_operands(kmean: torch.Tensor, dtype: torch.dtype, c_pad: int):
    """Zero-padded `[B*H, C_PAD, D]` gate operands: fp32 as is, or a high and a low half part."""
    bh, c, d = kmean.shape
    padded = torch.zeros(bh, c_pad, d, device=kmean.device, dtype=torch.float32)
    padded[:, :c] = kmean
    if dtype == torch.float32:
        return padded, padded, False
    hi = padded.to(dtype)
    lo = (padded - hi.to(torch.float32)).to(dtype)
    return hi, lo, True


def select_bits(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, config: VMoBAConfig, kind: str) -> Selection:
    """Gate and select on the device. `q, k [B, S, H, D]` -> `Selection`."""
    b, s, h, d = q.shape
    c = layout.num_blocks
    _check_supported(q, c)
    c_pad = _pad_blocks(c)
    cfg = gate_config(c_pad, d, interpreting())
    bm = cfg["BM"]
    n_tiles = triton.cdiv(s, bm)
    bh = b * h
    dev = q.device
    hi, lo, split = gate_operands(block_means(k, layout), q.dtype, c_pad)
    bits = torch.empty(b, h, s, c_pad // 32, device=dev, dtype=torch.int32)
    attended = torch.empty(bh, n_tiles, device=dev, dtype=torch.float32)
    mode, tau, topk = config.select, config.threshold, config.topk_for(kind)
    if mode != "topk" and (tau <= 0 or tau >= 1):
        mode, topk = "topk", (1 if tau <= 0 else c)  # self only, or everything
    cap = cfg["CAP"]
    m_take = 0
    # threshold_global's state; the one-pass modes get empty stand-ins (no allocations, no memsets)
    rows = (bh,) if mode == "threshold_global" else (0,)
    stats = torch.empty(*rows, n_tiles, 4, device=dev, dtype=torch.float32)
    ranges = torch.zeros(*rows, gate_k.RANGE_SLOTS.value, device=dev, dtype=torch.float32)
    nb = cfg["bins"]
    hist = torch.zeros(*rows, nb, device=dev, dtype=torch.int32)
    cand_val = torch.empty(*rows, cap, device=dev, dtype=torch.float32)
    cand_pair = torch.empty(*rows, cap, device=dev, dtype=torch.int32)
    cand_n = torch.zeros(*rows, device=dev, dtype=torch.int32)
    cutoff = torch.empty(*rows, device=dev, dtype=torch.int64)
    if mode == "threshold_global":  # pairs to take when every gate of a head is equal
        m_take = min(max(math.ceil(tau * s * c - s), 0), s * (c - 1))
    kind_id = {"1d": 1, "2d": 2, "3d": 3}[kind]
    groups, tail = column_groups(c)

    def gate_pass(phase: int):
        gate_k.vmoba_gate_kernel[(n_tiles, bh)](
            q, hi, lo, layout.ids, layout.lengths, bits, attended, stats, ranges, hist,
            cand_val, cand_pair, cand_n, cutoff, layout.geometry,
            q.stride(0), q.stride(1), q.stride(2),
            h, s, c, n_tiles, float(tau), int(topk), cap, m_take,
            BM=bm, C_PAD=c_pad, D=d, NB=nb, PHASE=phase, MODE_TOPK=mode == "topk",
            SPLIT=split, IEEE=q.dtype == torch.float32, KIND=kind_id,
            TOPK_ITER=mode == "topk" and min(topk, c) - 1 <= TOPK_ITER_MAX,
            GROUPS=groups, TAIL=tail, num_warps=cfg["num_warps"],
        )

    nt_pad = triton.next_power_of_2(n_tiles)

    def decide(step: int, counts=hist):
        gate_k.vmoba_decide_kernel[(bh,)](
            counts, stats, ranges, n_tiles, float(tau), cap if cfg["direct"] else -1,
            STEP=step, NB=counts.shape[-1], NT_PAD=nt_pad, num_warps=4,
        )

    if mode in ("topk", "threshold_query"):
        gate_pass(gate_k.PHASE_ROWS)
    else:
        gate_pass(gate_k.PHASE_MINMAX)
        gate_k.vmoba_range_kernel[(bh,)](stats, ranges, n_tiles, NT_PAD=nt_pad)
        gate_pass(gate_k.PHASE_HIST1)
        decide(1)
        hist.zero_()
        gate_pass(gate_k.PHASE_HIST2)  # skipped by heads whose first band fits the candidates
        decide(2)
        gate_pass(gate_k.PHASE_COMPACT)  # the mask outside the band; the band's pairs as candidates
        # level 3 over the candidates, in chunks, then the exact cutoff among the few near it
        chunk = 1024 if not interpreting() else 64
        chunks = (triton.cdiv(cap, chunk), bh)
        hist3 = torch.zeros(bh, NEAR_BINS, device=dev, dtype=torch.int32)
        gate_k.vmoba_band_hist_kernel[chunks](ranges, cand_val, cand_n, hist3, cap, NB=NEAR_BINS, CHUNK=chunk)
        decide(3, hist3)
        near = _near_buffers(bh, dev)
        gate_k.vmoba_near_kernel[chunks](ranges, cand_val, cand_pair, cand_n, *near, cap,
                                         NB=NEAR_BINS, CHUNK=chunk, NEAR=NEAR)
        gate_k.vmoba_cutoff_kernel[(bh,)](stats, ranges, cand_n, *near, cutoff, n_tiles, cap,
                                          NT_PAD=nt_pad, NEAR=NEAR, num_warps=1)
        gate_k.vmoba_patch_kernel[chunks](cand_val, cand_pair, cand_n, cutoff, layout.lengths, bits, attended,
                                          s, n_tiles, cap, BM=bm, W=c_pad // 32, CHUNK=chunk)
        gate_pass(gate_k.PHASE_MASK)  # only degenerate heads and those whose candidates overflowed
    per_query = max(1, min(topk, c)) if mode == "topk" else c
    return Selection(bits=bits, attended=attended, layout=layout, max_blocks_per_query=per_query)


def _near_buffers(bh: int, dev):
    """The third level's state per head: near-cutoff keys, their count, the lowest of them, and
    the mass of the candidates above them."""
    return (torch.empty(bh, NEAR, device=dev, dtype=torch.int64),
            torch.zeros(bh, device=dev, dtype=torch.int32),
            torch.full((bh,), torch.iinfo(torch.int64).max, device=dev, dtype=torch.int64),
            torch.zeros(bh, device=dev, dtype=torch.float64))


def select_mask(q, k, *, grid, kind: str, config: VMoBAConfig) -> torch.Tensor:
    """`select_blocks` on the device: BoolTensor `[B, H, S, C]`."""
    layout = block_layout(grid, kind, config, device=q.device)
    return select_bits(q, k, layout, config, kind).to_bool()


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
    attn_k.vmoba_count_kernel[(n_ct, bh)](selection.bits, tile_count, s, bh, c, n_ct, W=words, BLK=blk)
    flat = tile_count.view(-1)
    tile_base = torch.cumsum(flat, 0) - flat  # int64, exclusive
    per_query = selection.max_blocks_per_query
    qlist = torch.empty(bh * s * per_query, device=dev, dtype=torch.int32)
    attn_k.vmoba_scatter_kernel[(n_ct, bh)](selection.bits, tile_base, qlist, s, bh, c, n_ct, W=words, BLK=blk)
    seg_count = tile_count.sum(-1, dtype=torch.int32).view(-1)  # [C * BH]
    seg_tiles = (seg_count + (bm - 1)) // bm
    first_tile = torch.zeros(c * bh + 1, device=dev, dtype=torch.int32)
    torch.cumsum(seg_tiles, 0, out=first_tile[1:])
    # every segment has at most one partial tile
    item_seg = torch.empty(triton.cdiv(bh * s * per_query, bm) + c * bh, device=dev, dtype=torch.int32)
    attn_k.vmoba_items_kernel[(c * bh,)](seg_tiles, first_tile, item_seg, BLK=256)
    # the previous non-empty block of the same sample-head, as a segment index
    block = torch.arange(c, device=dev, dtype=torch.int32)[:, None].expand(c, bh)
    latest = torch.where(seg_tiles.view(c, bh) > 0, block, -1).cummax(0).values
    prev = torch.cat([torch.full((1, bh), -1, device=dev, dtype=torch.int32), latest[:-1]])
    heads = torch.arange(bh, device=dev, dtype=torch.int32)[None, :]
    wait = torch.where(prev >= 0, prev * bh + heads, -1)
    return QueryIndex(qlist=qlist, seg_start=tile_base.view(c, bh, n_ct)[:, :, 0].contiguous().view(-1),
                      seg_count=seg_count, seg_tiles=seg_tiles, first_tile=first_tile, item_seg=item_seg,
                      wait=wait.view(-1))


def attend(q, k, v, selection: Selection, softmax_scale: float, out=None, poison: bool = False) -> torch.Tensor:
    """Attention over the selected blocks: the query index, then one persistent launch.

    `out`: an optional preallocated `[B, S, H, D]` output. `poison` fills the internal state with
    NaN first (tests: any read of state no block wrote shows up in the output).
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
    kb, vb = (x.contiguous() if layout.is_identity else x.index_select(1, layout.perm) for x in (k, v))
    k_desc, v_desc = (TensorDescriptor.from_tensor(x.view(b * s, h * d), [cfg["BN"], d]) for x in (kb, vb))
    attn_k.vmoba_fwd_kernel[(n_prog,)](
        q, k_desc, v_desc, out, acc, ml, index.qlist,
        index.seg_start, index.seg_count, index.seg_tiles, index.first_tile, index.item_seg, index.wait, done,
        done[n_seg:],
        layout.starts, layout.lengths,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, s, bh, n_seg, softmax_scale * LOG2E,
        D=d, BM=cfg["BM"], BN=cfg["BN"], GRAB=cfg["grab"],
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg and not interpreting() else {}),
    )
    return out


def sparse_attention(q, k, v, *, grid, kind: str, config: VMoBAConfig, softmax_scale: float, stats=None):
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
