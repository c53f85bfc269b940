"""Gate and block selection: the public `select_blocks` (torch glue around the kernels)."""

from __future__ import annotations

import torch

from . import reference
from .config import KERNELS, VMoBAConfig
from .partition import block_ids, num_blocks
from .validate import check_inputs


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    grid,
    layer_idx: int,
    config: VMoBAConfig,
    kernel: str = "auto",
) -> torch.Tensor:
    """The key blocks each query attends to.

    `q, k [B, S, H, D]`, `grid = (T, Hg, Wg)` with `T*Hg*Wg == S` -> BoolTensor `[B, H, S, C]`,
    `C` the number of blocks of layer `layer_idx`'s kind. The query's own block is always set.
    `kernel="auto"` uses the GPU selection kernels for CUDA half-precision inputs and the
    reference otherwise; `"reference"` and `"triton"` force one.
    """
    grid = check_inputs(grid, layer_idx, config, q, k)
    kind = config.kind(layer_idx)
    if _use_triton(kernel, q):
        from .kernels.selection import select_mask

        return select_mask(q, k, grid=grid, kind=kind, config=config)
    ids = block_ids(grid, kind, config, device=q.device)
    g = reference.gate(q, k, ids, num_blocks(grid, kind, config))
    return reference.select_from_gate(
        g, ids, config.select, tau=config.threshold, k=config.topk_for(kind)
    )


def _use_triton(kernel: str, q: torch.Tensor) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "reference":
        return False
    if kernel == "triton":
        return True
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
