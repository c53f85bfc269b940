"""Ulysses context parallelism for VMoBA: the sequence of one video split over `N` ranks.

Each rank holds `S/N` consecutive tokens (raster order) of `q, k, v [B, S/N, H, D]`. One
all-to-all turns them into all `S` tokens of `H/N` heads (`heads_from_sequence`), every rank
runs the unchanged VMoBA kernels on its heads over the whole grid, and one all-to-all turns the
output back into the rank's tokens of all heads (`sequence_from_heads`). VMoBA's gate, its
selection (top-k or thresholds: per sample and head) and the attention of a head only read that
head, so a rank computes exactly what one process computes for those heads.

```python
import torch.distributed as dist
from vmoba.parallel import vmoba_attention_ulysses

out = vmoba_attention_ulysses(q, k, v, group=dist.group.WORLD, grid=(21, 45, 80), layer_idx=0,
                              config=cfg)          # q, k, v, out [B, S/N, H, D] on every rank
```

Rank `r` holds tokens `r*S/N .. (r+1)*S/N - 1` and, after the exchange, heads
`r*H/N .. (r+1)*H/N - 1` (the split diffusers' context-parallel hooks and its Ulysses attention
use, so the two mix within one model). `H` and `S` must be multiples of `N`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention import vmoba_attention
from .config import VMoBAConfig


def check_heads(heads: int, world: int) -> None:
    """`ValueError` unless `world` ranks can share `heads` attention heads evenly."""
    if world < 1 or heads % world:
        divisors = [n for n in range(2, heads + 1) if heads % n == 0]
        raise ValueError(
            f"context parallelism over {world} GPUs needs a head count divisible by {world}, "
            f"but the model has {heads} attention heads; use one of {divisors} GPUs per job"
        )


def check_tokens(tokens: int, world: int) -> None:
    """`ValueError` unless `world` ranks can share `tokens` sequence positions evenly."""
    if tokens % world:
        raise ValueError(
            f"a video of {tokens} latent tokens cannot be split over {world} GPUs (not a "
            f"multiple of {world}); choose a size or frame count whose latent grid is"
        )


def _world(group) -> int:
    return dist.get_world_size(group)


def heads_from_sequence(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """`P` tensors `[B, S/N, H, D]` (this rank's tokens, all heads) -> `P` contiguous tensors
    `[B, S, H/N, D]` (every token, this rank's heads), one all-to-all each.

    Each exchange is launched without waiting, so the layout copy of the next tensor overlaps the
    transfer of the previous one; at batch 1 what arrives is already `[S, H/N, D]` in order (a
    view, no copy)."""
    n = _world(group)
    first = tensors[0]
    b, s_local, h, d = first.shape
    check_heads(h, n)
    hl = h // n
    pending = []
    for x in tensors:
        if x.shape != first.shape:
            raise ValueError(
                f"q, k, v must have one shape, got {tuple(first.shape)} and {tuple(x.shape)}"
            )
        # send[j] = this rank's tokens of rank j's heads: [N, B, S/N, H/N, D]
        send = x.reshape(b, s_local, n, hl, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)  # recv[j] = rank j's tokens of this rank's heads
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        pending.append((work, send, recv))  # `send` lives until its exchange is done
    out = []
    for work, _send, recv in pending:
        work.wait()
        out.append(recv.transpose(0, 1).reshape(b, n * s_local, hl, d))
    return out


def sequence_from_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """`[B, S, H/N, D]` (every token, this rank's heads) -> `[B, S/N, H, D]` (this rank's
    tokens, all heads), in one all-to-all. The inverse of `heads_from_sequence`."""
    n = _world(group)
    b, s, hl, d = x.shape
    check_tokens(s, n)
    # [N, B, S/N, H/N, D]; at batch 1 already in order (a view)
    send = x.reshape(b, n, s // n, hl, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)  # recv[j] = heads of rank j for this rank's tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * hl, d)


def vmoba_attention_ulysses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    grid,
    layer_idx: int,
    config: VMoBAConfig,
    softmax_scale: float | None = None,
    kernel: str = "auto",
    stats: dict | None = None,
) -> torch.Tensor:
    """`vmoba_attention` of a sequence split over the ranks of `group` (see the module doc).

    `q, k, v [B, S/N, H, D]`: this rank's tokens of the video whose whole grid is `grid`
    -> `[B, S/N, H, D]`, equal to the same rows of `vmoba_attention` on the whole sequence.
    `stats` receives this rank's heads' counts (sum them over the ranks for the whole call).
    """
    qh, kh, vh = heads_from_sequence([q, k, v], group)
    out = vmoba_attention(
        qh,
        kh,
        vh,
        grid=grid,
        layer_idx=layer_idx,
        config=config,
        softmax_scale=softmax_scale,
        kernel=kernel,
        stats=stats,
    )
    return sequence_from_heads(out, group)
