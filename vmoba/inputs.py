"""Test and benchmark inputs with the spatio-temporal locality real video tokens have.

Random Gaussian q/k make every block mean alike, so threshold selection degenerates. Here q and k
share a smooth random field over `(t, h, w)`: a sum of `num_waves` cosines with random
frequencies of a few cycles per grid, each times a random per-head vector, plus Gaussian noise of
`noise` times the field's scale (`docs/vmoba.md` section 10).
"""

from __future__ import annotations

import math

import torch


def locality_qkv(
    grid,
    batch: int,
    heads: int,
    head_dim: int,
    *,
    dtype=torch.float32,
    device="cpu",
    num_waves: int = 12,
    max_cycles: float = 3.0,
    noise: float = 0.5,
    generator: torch.Generator | None = None,
):
    """`q, k, v [B, S, H, D]` with shared smooth structure in q and k (v is plain Gaussian)."""
    t, hg, wg = grid
    s = t * hg * wg
    gen = generator  # random parameters come from it (on the CPU); the big tensors are built on `device`
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(t) / t, torch.arange(hg) / hg, torch.arange(wg) / wg, indexing="ij"
        ),
        -1,
    )
    coords = coords.reshape(s, 3).to(device)  # [S, 3] in [0, 1)

    def field():
        # [B, W, 3]
        freqs = torch.rand(batch, num_waves, 3, generator=gen) * max_cycles * 2 * math.pi
        phase = torch.rand(batch, num_waves, generator=gen) * 2 * math.pi
        dirs = torch.randn(batch, num_waves, heads, head_dim, generator=gen)  # [B, W, H, D]
        freqs, phase, dirs = (x.to(device) for x in (freqs, phase, dirs))
        waves = torch.cos(torch.einsum("sc,bwc->bsw", coords, freqs) + phase[:, None])  # [B, S, W]
        f = torch.einsum("bsw,bwhd->bshd", waves, dirs) / math.sqrt(num_waves)
        return f / f.std()

    def gaussian():
        if gen is None:
            return torch.randn(batch, s, heads, head_dim, device=device)
        return torch.randn(batch, s, heads, head_dim, generator=gen).to(device)

    shared = field()
    q = (shared + 0.5 * field() + noise * gaussian()).to(dtype)
    k = (shared + 0.5 * field() + noise * gaussian()).to(dtype)
    v = gaussian().to(dtype)
    return q, k, v
