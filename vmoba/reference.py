"""Plain PyTorch VMoBA: the ground truth every fast path is compared against.

Slow and obviously right, on any device. Inputs `[B, S, H, D]`; half-precision inputs are
computed in fp32 (fp64 stays fp64) and the output is cast back.

Gate (section 3): `g[b,h,i,c] = q[b,i,h,:] . mean_{j in c} k[b,j,h,:]` in fp32, no scale.
Selection (section 4), with `n = (g - lo) / (hi - lo)` (all ones when `hi - lo` is ~0):
- `topk`: the self block plus the `k - 1` best other blocks of each query.
- `threshold_query`: the self block plus the fewest best other blocks with
  `n_self + sum >= tau * sum_c n_c`, per query.
- `threshold_global`: every self pair plus the fewest best other `(i, c)` pairs of a head with
  `sum_i n[i, self(i)] + sum >= tau * sum_{i,c} n[i, c]`.
Ties go to the lower block index, then the lower query index. Running sums use fp64 so that
the reference itself adds no rounding doubt; kernels may differ only at such margins.
"""

from __future__ import annotations

import math

import torch

# `hi - lo` at or below this fraction of `max(|hi|, |lo|)` counts as "all gates equal".
DEGENERATE_RANGE = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_means(k: torch.Tensor, ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Mean key of every block. `k [B, S, H, D]`, `ids [S]` -> `[B, C, H, D]` (fp32 or fp64)."""
    kf = k.to(compute_dtype(k.dtype))
    sums = torch.zeros(k.shape[0], num_blocks, *k.shape[2:], dtype=kf.dtype, device=k.device)
    sums.index_add_(1, ids, kf)
    counts = torch.bincount(ids, minlength=num_blocks).to(kf.dtype)
    return sums / counts[None, :, None, None]


def gate(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Gate scores `[B, H, S, C]`: every query against every block's mean key (fp32 or fp64)."""
    kmean = block_means(k, ids, num_blocks)  # [B, C, H, D]
    return torch.einsum("bshd,bchd->bhsc", q.to(kmean.dtype), kmean)


def normalise(g: torch.Tensor, dims) -> torch.Tensor:
    """Min-max normalisation over `dims`; all ones where the range is ~0."""
    lo = g.amin(dim=dims, keepdim=True)
    hi = g.amax(dim=dims, keepdim=True)
    span = hi - lo
    flat = span <= DEGENERATE_RANGE * torch.maximum(hi.abs(), lo.abs())
    n = (g - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(n), n)


def _self_index(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`ids` broadcast to `[B, H, S, 1]` for gather/scatter along the block axis."""
    return ids.view(1, 1, -1, 1).expand(*g.shape[:3], 1)


def _select_topk(g: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    c = g.shape[-1]
    k = min(k, c)
    self_idx = _self_index(ids, g)
    scores = g.scatter(-1, self_idx, math.inf)  # self first, always
    # stable sort: among equal scores the lower block index comes first
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(g, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def _threshold_start(g: torch.Tensor, ids: torch.Tensor, tau: float):
    """`(self index, self-only mask, answer)`: the answer is set when `tau` leaves nothing to choose."""
    self_idx = _self_index(ids, g)
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, self_idx, True)
    if tau <= 0 or g.shape[-1] == 1:
        return self_idx, mask, mask
    if tau >= 1:
        return self_idx, mask, torch.ones_like(mask)
    return self_idx, mask, None


def _take_until(self_mass: torch.Tensor, vals: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Which of the best-first `vals [..., n]` to take so that `self_mass` plus them first reaches
    `target` (`self_mass`, `target`: `[..., 1]`); all of them if it never does."""
    n = vals.shape[-1]
    # reached[m] says whether self + the m+1 best others meet the target
    reached = self_mass + torch.cumsum(vals, -1) >= target
    short = self_mass < target  # self alone is not enough
    m = torch.where(short, (~reached).sum(-1, keepdim=True) + 1, torch.zeros_like(self_mass).long())
    return torch.arange(n, device=vals.device) < m.clamp(max=n)


def _select_threshold_query(g: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    self_idx, mask, answer = _threshold_start(g, ids, tau)
    if answer is not None:
        return answer
    c = g.shape[-1]
    n = normalise(g, -1).double()
    target = tau * n.sum(-1, keepdim=True)  # [B, H, S, 1]
    n_self = n.gather(-1, self_idx)
    others = n.scatter(-1, self_idx, -math.inf)
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    vals, order = vals[..., : c - 1], order[..., : c - 1]  # self sorted last: drop it
    return mask.scatter_(-1, order, _take_until(n_self, vals, target)) | mask


def _select_threshold_global(g: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    self_idx, mask, answer = _threshold_start(g, ids, tau)
    if answer is not None:
        return answer
    b, h, s, c = g.shape
    n = normalise(g, (-2, -1)).double()
    target = tau * n.sum((-2, -1))  # [B, H]
    self_sum = n.gather(-1, self_idx).sum((-2, -1))
    # flatten block-major so a stable sort breaks ties by block, then by query
    others = n.scatter(-1, self_idx, -math.inf).transpose(-1, -2).reshape(b, h, c * s)
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    n_others = s * (c - 1)
    vals, order = vals[..., :n_others], order[..., :n_others]
    take = _take_until(self_sum[..., None], vals, target[..., None])
    flat = torch.zeros(b, h, c * s, dtype=torch.bool, device=g.device)
    flat.scatter_(-1, order, take)
    return flat.view(b, h, c, s).transpose(-1, -2) | mask


def select_from_gate(g: torch.Tensor, ids: torch.Tensor, mode: str, *, tau: float, k: int):
    """Selection mask `[B, H, S, C]` from gate scores `g [B, H, S, C]` and block ids `[S]`."""
    if mode == "topk":
        return _select_topk(g, ids, k)
    if mode == "threshold_query":
        return _select_threshold_query(g, ids, tau)
    if mode == "threshold_global":
        return _select_threshold_global(g, ids, tau)
    raise ValueError(f"unknown selection mode {mode!r}")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    ids: torch.Tensor,
    softmax_scale: float,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Dense attention with `-inf` on unselected blocks.

    `q [B, R, H, D]` (all `S` queries, or any `R` of them), `k, v [B, S, H, D]`,
    `selected [B, H, R, C]` bool (the rows of `q`), `ids [S]` -> `[B, R, H, D]` in the dtype of
    `q`. Queries are processed in chunks so memory stays bounded at large `S`.
    """
    bsz, s, h, _ = q.shape
    cdt = compute_dtype(q.dtype)
    if query_chunk is None:  # about 256M score elements per chunk
        query_chunk = max(1, min(s, (1 << 28) // max(1, bsz * h * k.shape[1])))
    qf, kf, vf = (x.to(cdt).transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
    out = torch.empty_like(qf)
    for i0 in range(0, s, query_chunk):
        i1 = min(s, i0 + query_chunk)
        scores = torch.matmul(qf[:, :, i0:i1], kf.transpose(-1, -2)) * softmax_scale
        allowed = selected[:, :, i0:i1][..., ids]  # [B, H, chunk, S]
        scores.masked_fill_(~allowed, -math.inf)
        out[:, :, i0:i1] = torch.matmul(torch.softmax(scores, -1), vf)
    return out.transpose(1, 2).to(q.dtype)
