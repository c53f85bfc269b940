"""Recommended VMoBA settings for a model and a video grid (docs/vmoba.md, "Which selection").

- Stock weights (not trained with VMoBA): local `topk` with the paper's `k` per layer kind
  (Appendix A, Table 4: 480x832 -> 2 / 6 / 18, 720x1280 -> 2 / 10 / 9), since global threshold
  selection without fine-tuning made the authors' videos vibrate. At any other grid each kind
  gets the `k` whose density `k / C` (C = that kind's block count) is nearest the paper's density
  for that kind at the paper grid closest in token count, `k = floor(density * C + 1/2)` clipped
  to `[1, C]` (a half rounds up: the larger `k`, the closer to dense).
- VMoBA-trained weights: `threshold_global`, tau 0.25 (the paper's setting for trained models).
- Both keep the first 25% of the denoising steps dense.
"""

from __future__ import annotations

import math

from .config import LAYER_KINDS, auto_chunks, check_grid

DENSE_STEPS = 0.25
TRAINED_THRESHOLD = 0.25
# Paper Table 4 (training-free top-k) at its two grids, k per kind (1d, 2d, 3d).
PAPER_TOPK = {
    (21, 30, 52): (2, 6, 18),  # 81 x 480 x 832
    (21, 45, 80): (2, 10, 9),  # 81 x 720 x 1280
}


def block_counts(grid, chunks=None) -> tuple[int, int, int]:
    """Blocks per layer kind `(1d, 2d, 3d)` at `grid` with `chunks` (default: `auto_chunks`)."""
    t, hg, wg = check_grid(grid)
    ct, (ch, cw), (st, sh, sw) = chunks or auto_chunks(grid)
    return (
        math.ceil(t / ct),
        math.ceil(hg / ch) * math.ceil(wg / cw),
        math.ceil(t / st) * math.ceil(hg / sh) * math.ceil(wg / sw),
    )


def paper_densities(grid) -> tuple[float, ...]:
    """The paper's top-k density per kind at the Table 4 grid nearest `grid` in token count."""
    tokens = math.prod(check_grid(grid))
    nearest = min(PAPER_TOPK, key=lambda g: (abs(math.prod(g) - tokens), g))
    return tuple(k / c for k, c in zip(PAPER_TOPK[nearest], block_counts(nearest)))


def topk_for_grid(grid, chunks=None) -> tuple[int, int, int]:
    """The training-free `k` per kind `(1d, 2d, 3d)` at `grid` (the rule in the docstring)."""
    grid = check_grid(grid)
    if chunks is None and grid in PAPER_TOPK:
        return PAPER_TOPK[grid]
    counts = block_counts(grid, chunks)
    ks = (min(c, max(1, math.floor(d * c + 0.5))) for d, c in zip(paper_densities(grid), counts))
    return tuple(ks)  # type: ignore[return-value]


def recommended_settings(grid, *, vmoba_trained: bool) -> dict:
    """The attention settings a model's defaults give at `grid` (JSON form)."""
    if vmoba_trained:
        return {
            "backend": "vmoba",
            "select": "threshold_global",
            "threshold": TRAINED_THRESHOLD,
            "dense_steps": DENSE_STEPS,
        }
    return {
        "backend": "vmoba",
        "select": "topk",
        "topk": list(topk_for_grid(grid)),
        "dense_steps": DENSE_STEPS,
    }


assert len(LAYER_KINDS) == 3  # the rule above is written per kind (1d, 2d, 3d)
