"""The trainable Triton path of `vmoba_attention`: a forward that keeps what the backward needs,
the backward, and the custom ops that join them (`vmoba::sparse_attention_fwd` with its
autograd registered, `vmoba::sparse_attention_bwd`), so `torch.compile` traces training too.

`attention_forward` and `attention_backward` are the pair: the forward returns tensors only (the
output and `Saved`), and the backward takes them back with the same keyword arguments. The
selection is discrete, so `q` and `k` get gradients through the attention only (as in the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import VMoBAConfig, config_args, config_from_args
from .kernels.attention import attend
from .kernels.backward import attend_backward
from .kernels.selection import (
    Selection,
    blocks_per_query_bound,
    select_bits,
    selection_shapes,
)
from .partition import block_layout, num_blocks


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


# -- the custom ops: what `torch.compile` traces (forward and backward alike) -----------------
# `vmoba::sparse_attention_fwd` returns the output with `Saved`; its registered autograd saves
# them and calls `vmoba::sparse_attention_bwd`. Every argument but the tensors is a constant.


@torch.library.custom_op("vmoba::sparse_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    kind: str,
    chunks: list[int],
    select: str,
    threshold: float,
    topk: list[int],
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    config = config_from_args(chunks, select, threshold, topk)
    out, saved = attention_forward(
        q, k, v, grid=tuple(grid), kind=kind, config=config, softmax_scale=softmax_scale
    )
    return out, *saved


@_fwd_op.register_fake
def _fwd_fake(q, k, v, grid, kind, chunks, select, threshold, topk, softmax_scale):
    b, s, h, _ = q.shape
    config = config_from_args(chunks, select, threshold, topk)
    bits, attended = selection_shapes(q.shape, num_blocks(tuple(grid), kind, config))
    return (
        q.new_empty(q.shape),
        q.new_empty((b * h, s), dtype=torch.float32),
        q.new_empty(bits, dtype=torch.int32),
        q.new_empty(attended, dtype=torch.float32),
    )


@torch.library.custom_op("vmoba::sparse_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bits: torch.Tensor,
    attended: torch.Tensor,
    grid: list[int],
    kind: str,
    chunks: list[int],
    select: str,
    threshold: float,
    topk: list[int],
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = config_from_args(chunks, select, threshold, topk)
    return attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        Saved(lse, bits, attended),
        grid=tuple(grid),
        kind=kind,
        config=config,
        softmax_scale=softmax_scale,
    )


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, bits, attended, *constants):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *constants = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(*output[1:])  # the log-sum-exp, selection and counts
    ctx.constants = constants


def _backward(ctx, grad_out, _lse, _bits, _attended):
    q, k, v, out, lse, bits, attended = ctx.saved_tensors
    dq, dk, dv = torch.ops.vmoba.sparse_attention_bwd(
        grad_out, q, k, v, out, lse, bits, attended, *ctx.constants
    )
    return (dq, dk, dv) + (None,) * len(ctx.constants)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def trainable_attention(
    q, k, v, *, grid, kind: str, config: VMoBAConfig, softmax_scale: float, stats=None
) -> torch.Tensor:
    """`sparse_attention` with a backward (through the ops above, so it compiles). `stats` as
    there (no sync)."""
    out, _lse, _bits, attended = torch.ops.vmoba.sparse_attention_fwd(
        q, k, v, list(grid), kind, *config_args(config), softmax_scale
    )
    if stats is not None:
        stats["attended"] = attended.double().sum()
        stats["num_blocks"] = block_layout(grid, kind, config, device=q.device).num_blocks
    return out
