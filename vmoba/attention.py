"""The public op `vmoba_attention`."""

from __future__ import annotations

import torch

from . import reference
from .config import VMoBAConfig
from .flops import attended_tokens
from .partition import block_layout
from .select import _use_triton, select_blocks
from .validate import check_inputs, resolve_scale


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid,
    layer_idx: int,
    config: VMoBAConfig,
    softmax_scale: float | None = None,
    kernel: str = "auto",
    stats: dict | None = None,
) -> torch.Tensor:
    """VMoBA self-attention over the tokens of a latent video.

    `q, k, v [B, S, H, D]` with `S = T*Hg*Wg` tokens of `grid = (T, Hg, Wg)` in raster order
    -> `[B, S, H, D]` in the dtype of `q`. Layer `layer_idx` picks the partition kind
    (`config.layer_kinds`); each query attends to the tokens of the key blocks
    `select_blocks` gives it (its own block always). `softmax_scale` defaults to `1/sqrt(D)`.

    `kernel`: `"triton"` (CUDA, fp16/bf16, `D` in {64, 128}), `"reference"` (plain PyTorch, any
    device), or `"auto"` (Triton for CUDA half-precision inputs, the reference otherwise). Both
    are differentiable in `q, k, v` for the selection they made (the gate and selection are
    discrete and get no gradient); the Triton path saves what its backward needs only when grad
    mode is on and an input requires grad (`vmoba.autograd`).

    `stats`: an optional dict that receives, without a host sync, `attended` (a 0-dim fp64 device
    tensor: `sum_{b,h,i} |K(b,h,i)|`, the key tokens attended) and `num_blocks` (`C`).
    """
    grid = check_inputs(grid, layer_idx, config, q, k, v)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    kind = config.kind(layer_idx)
    if _use_triton(kernel, q):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            from .autograd import trainable_attention

            return trainable_attention(
                q, k, v, grid=grid, kind=kind, config=config, softmax_scale=scale, stats=stats
            )
        from .kernels.attention import sparse_attention

        return sparse_attention(
            q, k, v, grid=grid, kind=kind, config=config, softmax_scale=scale, stats=stats
        )
    selected = select_blocks(
        q, k, grid=grid, layer_idx=layer_idx, config=config, kernel="reference"
    )
    layout = block_layout(grid, kind, config, device=q.device)
    if stats is not None:
        stats["attended"] = attended_tokens(selected, layout.lengths).sum()
        stats["num_blocks"] = layout.num_blocks
    return reference.masked_attention(q, k, v, selected, layout.ids, scale)
