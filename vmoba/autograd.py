"""The trainable Triton path of `vmoba_attention`: a forward that keeps what the backward needs,
the backward, and the private autograd Function that joins them.

`attention_forward` and `attention_backward` are the pair a `torch.library` custom op registers
with `register_autograd`: the forward returns tensors only (the output and `Saved`), and the
backward takes them back with the same keyword arguments. The selection is discrete, so `q` and
`k` get gradients through the attention only (as in the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import VMoBAConfig
from .kernels.attention import attend
from .kernels.backward import attend_backward
from .kernels.selection import Selection, blocks_per_query_bound, select_bits
from .partition import block_layout


class Saved(NamedTuple):
    """What the backward needs besides `q, k, v` and the output (small: no `[S, S]` state)."""

    lse: torch.Tensor  # [B*H, S] fp32: each query's log-sum-exp (log2 domain, scale included)
    bits: torch.Tensor  # [B, H, S, W] int32: the selection (`Selection.bits`)
    attended: torch.Tensor  # [B*H, n_tiles] fp32: tokens attended per query tile (`stats`)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple,
    kind: str,
    config: VMoBAConfig,
    softmax_scale: float,
) -> tuple[torch.Tensor, Saved]:
    """Select and attend like `sparse_attention`, keeping the log-sum-exp and the selection.
    `q, k, v [B, S, H, D]` -> `out [B, S, H, D]`, `Saved`."""
    layout = block_layout(grid, kind, config, device=q.device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    selection = select_bits(q, k, layout, config, kind)
    b, s, h, _ = q.shape
    lse = torch.empty(b * h, s, device=q.device, dtype=torch.float32)
    out = attend(q, k, v, selection, softmax_scale, lse=lse)
    return out, Saved(lse=lse, bits=selection.bits, attended=selection.attended)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    saved: Saved,
    *,
    grid: tuple,
    kind: str,
    config: VMoBAConfig,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dq, dk, dv` for `grad_out`, given the forward's inputs, output and `Saved`."""
    layout = block_layout(grid, kind, config, device=q.device)
    selection = Selection(
        bits=saved.bits,
        attended=saved.attended,
        layout=layout,
        max_blocks_per_query=blocks_per_query_bound(config, kind, layout.num_blocks),
    )
    return attend_backward(grad_out, q, k, v, out, saved.lse, selection, softmax_scale)


class _VMoBAAttention(torch.autograd.Function):
    """Runs only when a gradient is wanted, so inference never saves anything."""

    @staticmethod
    def forward(ctx, q, k, v, grid, kind, config, softmax_scale):
        out, saved = attention_forward(
            q, k, v, grid=grid, kind=kind, config=config, softmax_scale=softmax_scale
        )
        ctx.save_for_backward(q, k, v, out, *saved)
        ctx.options = dict(grid=grid, kind=kind, config=config, softmax_scale=softmax_scale)
        ctx.mark_non_differentiable(saved.attended)
        return out, saved.attended

    @staticmethod
    def backward(ctx, grad_out, _grad_attended):
        q, k, v, out, *saved = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, Saved(*saved), **ctx.options)
        return dq, dk, dv, None, None, None, None


def trainable_attention(
    q, k, v, *, grid, kind: str, config: VMoBAConfig, softmax_scale: float, stats=None
) -> torch.Tensor:
    """`sparse_attention` with a backward. `stats` as there (no sync)."""
    out, attended = _VMoBAAttention.apply(q, k, v, grid, kind, config, softmax_scale)
    if stats is not None:
        stats["attended"] = attended.double().sum()
        stats["num_blocks"] = block_layout(grid, kind, config, device=q.device).num_blocks
    return out
