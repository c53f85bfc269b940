"""VMoBA as PyTorch custom ops, so `torch.compile` traces a model around them in one graph.

- `vmoba::attention(q, k, v, grid, kind, chunks, select, threshold, topk, softmax_scale,
  kernel) -> (out, attended)`: one VMoBA self-attention call, a pure function of its arguments (the
  `VMoBAConfig` is spelled out as plain values, the layer kind already resolved). `attended`
  is the 0-dim fp64 count `sum |K|` of key tokens attended (what `stats["attended"]` is for
  `vmoba_attention`). Its fake implementation gives the output shapes, so the compiler needs
  no look inside; a backward fits `torch.library.register_autograd` on it (inputs q, k, v,
  every other argument a constant saved by `setup_context`).
- `vmoba::self_attention(q, k, v, processor)`: what a `VMoBAAttnProcessor` runs once its
  projections, norms and rotary embedding are done. `processor` is a key of `PROCESSORS` in a
  0-dim CPU int64 tensor (read without a device sync; a tensor, so that the blocks sharing one
  compiled code pass different keys as graph inputs instead of failing an int guard);
  at run time the op asks that processor what the current transformer call wants (dense or
  VMoBA, which settings, the grid, the statistics to collect) and runs it. Per-request
  settings are read inside the op, never by the traced code, so they cannot cause a
  recompilation or a graph break; the traced code sees only tensors.

Both ops return contiguous `[B, S, H, D]` outputs (what their fake implementations promise).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .config import VMoBAConfig, config_args, config_from_args

# processor key -> the object whose `attend(q, k, v)` runs the call; weak, so a removed
# processor does not stay alive here
PROCESSORS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_processor(processor) -> int:
    """A new key under which `vmoba::self_attention` finds `processor`."""
    key = next(_KEYS)
    PROCESSORS[key] = processor
    return key


@torch.library.custom_op("vmoba::attention", mutates_args=())
def attention(
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
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .attention import vmoba_attention

    config = config_from_args(chunks, select, threshold, topk).replace(layer_kinds=(kind,))
    stats: dict = {}
    out = vmoba_attention(
        q,
        k,
        v,
        grid=grid,
        layer_idx=0,
        config=config,
        softmax_scale=softmax_scale,
        kernel=kernel,
        stats=stats,
    )
    return out.contiguous(), stats["attended"].reshape(())


@attention.register_fake
def _attention_fake(q, k, v, grid, kind, chunks, select, threshold, topk, softmax_scale, kernel):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (), dtype=torch.float64
    )


@torch.library.custom_op("vmoba::self_attention", mutates_args=())
def self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, processor: torch.Tensor
) -> torch.Tensor:
    owner = PROCESSORS.get(int(processor))
    if owner is None:
        raise RuntimeError(f"no VMoBA processor {processor} (removed?)")
    return owner.attend(q, k, v).contiguous()


@self_attention.register_fake
def _self_attention_fake(q, k, v, processor):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def call_attention(
    q, k, v, *, grid, kind: str, config: VMoBAConfig, softmax_scale: float, kernel: str = "auto"
):
    """`vmoba::attention` with a `VMoBAConfig` -> `(out, attended)`."""
    op: Callable = torch.ops.vmoba.attention
    return op(q, k, v, list(grid), kind, *config_args(config), softmax_scale, kernel)
