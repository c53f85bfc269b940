"""Which block each token is in (`docs/vmoba.md` section 2).

Token `n` of a `(T, Hg, Wg)` grid is `(t, h, w)` in raster order, `n = t*Hg*Wg + h*Wg + w`.

| kind | block of `(t, h, w)`                              | blocks `C`       |
|------|----------------------------------------------------|------------------|
| 1d   | `t // ct`                                          | `nT`             |
| 2d   | `(h // ch) * nW + w // cw`                         | `nH * nW`        |
| 3d   | `((t // ct) * nH + h // ch) * nW + w // cw`        | `nT * nH * nW`   |

with `nT = ceil(T/ct)`, `nH = ceil(Hg/ch)`, `nW = ceil(Wg/cw)`. Edge blocks are smaller when a
chunk does not divide the grid; a chunk larger than its dimension gives one block along it.

`BlockLayout` adds what the fast path needs: the stable permutation that makes every block
contiguous (tokens keep their raster order inside a block), each block's start and length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import LAYER_KINDS, VMoBAConfig, check_grid


def _counts(grid, kind: str, config: VMoBAConfig):
    t, hg, wg = check_grid(grid)
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")
    ct, ch, cw = config.chunk_for(kind)
    ct = ct or t  # a kind that does not cut a dimension treats it as one chunk
    ch = ch or hg
    cw = cw or wg
    return (t, hg, wg), (ct, ch, cw), (math.ceil(t / ct), math.ceil(hg / ch), math.ceil(wg / cw))


def num_blocks(grid, kind: str, config: VMoBAConfig) -> int:
    """Number of blocks `C` of a kind on a grid."""
    _, _, (n_t, n_h, n_w) = _counts(grid, kind, config)
    return n_t * n_h * n_w


def block_ids(grid, kind: str, config: VMoBAConfig, device=None) -> torch.Tensor:
    """Block index of every token, natural (raster) token order.

    Returns a LongTensor `[S]` with values in `[0, C)`, `S = T*Hg*Wg`.
    """
    (t, hg, wg), (ct, ch, cw), (n_t, n_h, n_w) = _counts(grid, kind, config)
    bt = torch.arange(t, device=device) // ct  # [T]
    bh = torch.arange(hg, device=device) // ch  # [Hg]
    bw = torch.arange(wg, device=device) // cw  # [Wg]
    ids = (bt[:, None, None] * n_h + bh[None, :, None]) * n_w + bw[None, None, :]
    return ids.reshape(-1)


@dataclass(frozen=True)
class BlockLayout:
    """A partition in the form kernels use (all tensors on one device, int32 unless noted).

    - `ids`: `[S]` int64 block of each token (natural order).
    - `perm`: `[S]` natural index of the token at each blocked position (blocks contiguous).
    - `inv_perm`: `[S]` blocked position of each natural token.
    - `starts`, `lengths`: `[C]` first blocked position and token count of each block.
    - `max_len`: the largest block's length (a Python int, known without a device sync).
    - `geometry`: `[9]` int32 `T, Hg, Wg, ct, ch, cw, nT, nH, nW` with the kind's effective
      chunks (a dimension the kind does not cut is one chunk).
    """

    grid: tuple
    kind: str
    num_blocks: int
    max_len: int
    ids: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    geometry: torch.Tensor

    @property
    def is_identity(self) -> bool:
        """1D blocks are already contiguous in raster order: no permutation is needed."""
        return self.kind == "1d"


@lru_cache(maxsize=64)
def _layout(grid, kind, chunks, device_str) -> BlockLayout:
    config = VMoBAConfig(temporal_chunk=chunks[0], spatial_chunk=chunks[1], st_chunk=chunks[2])
    ids = block_ids(grid, kind, config)  # built on the CPU once, then moved
    c = num_blocks(grid, kind, config)
    dims, eff_chunks, counts = _counts(grid, kind, config)
    perm = torch.sort(ids, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    lengths = torch.bincount(ids, minlength=c)
    starts = torch.cumsum(lengths, 0) - lengths
    device = torch.device(device_str)
    return BlockLayout(
        grid=grid,
        kind=kind,
        num_blocks=c,
        max_len=int(lengths.max()),
        ids=ids.to(device),
        perm=perm.to(device=device, dtype=torch.int32),
        inv_perm=inv_perm.to(device=device, dtype=torch.int32),
        starts=starts.to(device=device, dtype=torch.int32),
        lengths=lengths.to(device=device, dtype=torch.int32),
        geometry=torch.tensor([*dims, *eff_chunks, *counts], dtype=torch.int32, device=device),
    )


def block_layout(grid, kind: str, config: VMoBAConfig, device="cpu") -> BlockLayout:
    """The cached `BlockLayout` of a kind on a grid, on `device`."""
    grid = check_grid(grid)
    num_blocks(grid, kind, config)  # validates the kind
    chunks = (config.temporal_chunk, config.spatial_chunk, config.st_chunk)
    return _layout(grid, kind, chunks, str(torch.device(device)))
