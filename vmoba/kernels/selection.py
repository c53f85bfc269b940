"""The selection on the device: pooling, then the per-query or the global algorithm, as a bitmask.

`select_bits` runs block-mean pooling (`pooling`), then `select_query` (`topk`, `threshold_query`)
or `select_global` (`threshold_global`), and returns a `Selection`. No host synchronisation, so a
denoising step can be captured in a CUDA graph. Works on CUDA and, for tests, under the Triton
CPU interpreter (`TRITON_INTERPRET=1`).

Half-precision inputs: the fp32 block means are split into a high and a low half-precision part,
so the gate is two tensor-core dots accumulated in fp32 (about 22 mantissa bits instead of 24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..config import VMoBAConfig
from ..partition import BlockLayout, block_layout
from .common import check_supported, interpreting, pad_blocks
from .configs import gate_config
from .pooling import block_means
from .select_global import select_global
from .select_query import select_per_query


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


def selection_shapes(q_shape, num_blocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of `Selection.bits` and `Selection.attended` for `q [B, S, H, D]`."""
    b, s, h, d = q_shape
    c_pad = pad_blocks(num_blocks)
    n_tiles = triton.cdiv(s, gate_config(c_pad, d, interpreting())["BM"])
    return (b, h, s, c_pad // 32), (b * h, n_tiles)


def select_bits(
    q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, config: VMoBAConfig, kind: str
) -> Selection:
    """Gate and select on the device. `q, k [B, S, H, D]` -> `Selection`."""
    d = q.shape[-1]
    c = layout.num_blocks
    check_supported(q, c)
    c_pad = pad_blocks(c)
    cfg = gate_config(c_pad, d, interpreting())
    dev = q.device
    hi, lo, split = gate_operands(block_means(k, layout), q.dtype, c_pad)
    bits_shape, attended_shape = selection_shapes(q.shape, c)
    bits = torch.empty(bits_shape, device=dev, dtype=torch.int32)
    attended = torch.empty(attended_shape, device=dev, dtype=torch.float32)
    mode, tau, topk = config.select, config.threshold, config.topk_for(kind)
    if mode != "topk" and (tau <= 0 or tau >= 1):
        mode, topk = "topk", (1 if tau <= 0 else c)  # self only, or everything
    if mode == "threshold_global":
        select_global(q, hi, lo, split, layout, bits, attended, cfg, tau=tau, kind=kind)
    else:
        select_per_query(
            q, hi, lo, split, layout, bits, attended, cfg, mode=mode, tau=tau, topk=topk
        )
    return Selection(
        bits=bits,
        attended=attended,
        layout=layout,
        max_blocks_per_query=blocks_per_query_bound(config, kind, c),
    )


def blocks_per_query_bound(config: VMoBAConfig, kind: str, num_blocks: int) -> int:
    """The most blocks a query can select, known on the host: top-k's k, else every block."""
    tau, topk = config.threshold, config.topk_for(kind)
    if config.select != "topk" and (tau <= 0 or tau >= 1):
        return 1 if tau <= 0 else num_blocks
    return max(1, min(topk, num_blocks)) if config.select == "topk" else num_blocks


def select_mask(q, k, *, grid, kind: str, config: VMoBAConfig) -> torch.Tensor:
    """`select_blocks` on the device: BoolTensor `[B, H, S, C]`."""
    layout = block_layout(grid, kind, config, device=q.device)
    return select_bits(q, k, layout, config, kind).to_bool()
