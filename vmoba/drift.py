"""How far sparse attention moves a layer's output from dense attention (issue #16).

Dense attention over all `S` keys is the reference. For a sample of query rows (dense work for
those rows only: `R x S` scores instead of `S x S`) it measures, per sample, head and row:

- the **relative L2 error** of the sparse output row against the dense one,
  `||o_sparse - o_dense|| / ||o_dense||`, reported pooled over the rows as
  `sqrt(sum ||o_sparse - o_dense||^2 / sum ||o_dense||^2)` (rows with a tiny dense output do not
  dominate it);
- the **softmax mass kept**: the share of the row's dense softmax probability that falls on the
  keys the sparse selection attends to (1 when every key is attended), averaged over rows.

Both are computed in fp32 (fp64 inputs stay fp64). The sparse output is either the one the
kernel produced (`out`: the error then includes the kernel's own rounding, a few 1e-3 in bf16)
or, without `out`, the fp32 masked softmax of the selection (the error of the selection alone).

```python
from vmoba.drift import attention_drift

d = attention_drift(q, k, v, grid=grid, layer_idx=1, config=cfg, out=out)  # out: vmoba_attention's
d.rel_l2, d.mass_kept, d.rows
```

`drift_sums` is the device-side core: no host synchronisation, so the diffusers statistics can
add its result to running device tensors per layer and read them once at the end of a call. It
takes any block-level selection (`[B, H, R, C]` bool for the sampled rows plus each key's block
id), so tile-level masks (blocks = 128-token tiles) go through the same code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .config import VMoBAConfig
from .partition import block_ids
from .reference import compute_dtype
from .select import select_blocks
from .validate import check_inputs, resolve_scale

# Query rows sampled per attention call by default: enough for a stable pooled number (every
# call contributes B*H*R row vectors) while the dense work stays R/S of a dense layer.
DEFAULT_ROWS = 128
# The sample of rows is fixed for a given (S, R): the same tokens in every layer and step.
ROW_SEED = 0
# Score elements per chunk of rows (fp32): bounds the dense work's memory at large S.
CHUNK_ELEMENTS = 1 << 26

# One selection for `drift_sums`: `[B, H, R, C]` bool (block selected for each sampled row) and
# `[S]` int64 block id of every key token.
Selection = tuple[torch.Tensor, torch.Tensor]

# Layout of the sums `drift_sums` returns along its last dim.
ERR2, REF2, MASS = 0, 1, 2


@dataclass(frozen=True)
class Drift:
    """Sparse against dense attention on sampled rows (see the module docstring)."""

    rel_l2: float  # sqrt(sum ||o_s - o_d||^2 / sum ||o_d||^2) over the sampled rows
    mass_kept: float  # mean over rows of the dense softmax mass on attended keys, in [0, 1]
    rows: int  # row vectors measured: batch * heads * sampled query rows

    @classmethod
    def from_sums(cls, sums, rows: int) -> Drift:
        """From `drift_sums` output (a `[3]` tensor or sequence: err2, ref2, mass) and the count."""
        err2, ref2, mass = (float(x) for x in sums)
        return cls(
            rel_l2=math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, mass_kept=mass / rows, rows=rows
        )

    def to_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "mass_kept": self.mass_kept, "rows": self.rows}


def sample_rows(tokens: int, rows: int = DEFAULT_ROWS, device="cpu") -> torch.Tensor:
    """The query rows measured: `min(rows, tokens)` distinct token indices, sorted, int64.

    A fixed pseudo-random sample (seed `ROW_SEED`), so no stride aliases with the grid; cached
    per device, so after the first call no host-to-device copy (and no sync) is needed.
    """
    if rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    return _rows(int(tokens), int(rows), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _rows(tokens: int, rows: int, device: str) -> torch.Tensor:
    if rows >= tokens:
        idx = torch.arange(tokens)
    else:
        gen = torch.Generator().manual_seed(ROW_SEED)
        idx = torch.randperm(tokens, generator=gen)[:rows].sort().values
    return idx.to(device)


def drift_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    selections: Sequence[Selection],
    *,
    outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Device sums for `Drift`, one row of `[err2, ref2, mass]` (fp64) per selection: `[M, 3]`.

    - `q, k, v [B, S, H, D]`; `rows [R]` int64 query rows (`sample_rows`).
    - `selections`: `M` pairs `(selected [B, H, R, C] bool, ids [S] int64)`: which blocks each
      sampled row attends to, and the block of each key token.
    - `outs`: per selection, the sparse output rows `[B, R, H, D]` to judge (e.g. the kernel's
      `out[:, rows]`), or `None` to use the fp32 masked softmax of the selection.

    The dense scores of the rows are computed once and shared by all selections, in chunks of
    rows so that at most about `CHUNK_ELEMENTS` scores are held. No host synchronisation.
    The number of row vectors is `B * H * R` (the caller knows it).
    """
    b, s, h, d = q.shape
    scale = resolve_scale(softmax_scale, d)
    cdt = compute_dtype(q.dtype)
    if outs is None:
        outs = [None] * len(selections)
    if len(outs) != len(selections):
        raise ValueError(f"{len(outs)} outputs for {len(selections)} selections")
    kf = k.to(cdt).transpose(1, 2)  # [B, H, S, D]
    vf = v.to(cdt).transpose(1, 2)
    r = rows.numel()
    chunk = max(1, min(r, CHUNK_ELEMENTS // max(1, b * h * s)))
    sums = torch.zeros(len(selections), 3, dtype=torch.float64, device=q.device)
    for r0 in range(0, r, chunk):
        part = slice(r0, min(r, r0 + chunk))
        idx = rows[part]
        qr = q[:, idx].to(cdt).transpose(1, 2)  # [B, H, r, D]
        scores = torch.matmul(qr, kf.transpose(-1, -2)) * scale  # [B, H, r, S]
        probs = torch.softmax(scores, -1)
        dense = torch.matmul(probs, vf)  # [B, H, r, D]
        ref2 = dense.double().square().sum()
        for m, ((selected, ids), out) in enumerate(zip(selections, outs)):
            allowed = selected[:, :, part][..., ids]  # [B, H, r, S]
            mass = torch.where(allowed, probs, 0.0).sum(-1).double().sum()  # per-row sums in cdt
            if out is None:
                masked = scores.masked_fill(~allowed, -math.inf)
                sparse = torch.matmul(torch.softmax(masked, -1), vf)
            else:
                sparse = out[:, part].to(cdt).transpose(1, 2)
            err2 = (sparse - dense).double().square().sum()
            sums[m] += torch.stack((err2, ref2, mass))
    return sums


def rows_of(selected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`selected [B, H, S, C]` -> the sampled rows' `[B, H, R, C]`."""
    return selected[:, :, rows]


def attention_drift(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid,
    layer_idx: int,
    config: VMoBAConfig,
    out: Optional[torch.Tensor] = None,
    selected: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    rows: int = DEFAULT_ROWS,
    softmax_scale: Optional[float] = None,
) -> Drift:
    """VMoBA's output against dense attention on `rows` sampled query rows (one host read).

    `q, k, v [B, S, H, D]` and `grid, layer_idx, config` as for `vmoba_attention`. `selected`
    `[B, H, S, C]` is the selection to judge; by default `select_blocks(..., kernel=kernel)`,
    the selection `vmoba_attention(..., kernel=kernel)` computes (it is deterministic). `out`
    (`[B, S, H, D]`, `vmoba_attention`'s output) is judged as is; without it, the fp32 masked
    softmax of the selection. Returns a `Drift` (`rel_l2`, `mass_kept`, `rows`).
    """
    grid = check_inputs(grid, layer_idx, config, q, k, v)
    kind = config.kind(layer_idx)
    if selected is None:
        selected = select_blocks(q, k, grid=grid, layer_idx=layer_idx, config=config, kernel=kernel)
    idx = sample_rows(q.shape[1], rows, q.device)
    ids = block_ids(grid, kind, config, device=q.device)
    outs = None if out is None else [out[:, idx]]
    sums = drift_sums(
        q, k, v, idx, [(rows_of(selected, idx), ids)], outs=outs, softmax_scale=softmax_scale
    )
    b, _, h, _ = q.shape
    return Drift.from_sums(sums[0].tolist(), b * h * idx.numel())
