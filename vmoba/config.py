"""VMoBA settings, validated on construction.

A config says how each layer kind cuts the latent video grid `(T, Hg, Wg)` into blocks and how
queries select key blocks. See `../shared/design/vmoba.md` sections 2 and 4 for the semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Tuple

LAYER_KINDS = ("1d", "2d", "3d")
SELECT_MODES = ("topk", "threshold_query", "threshold_global")

Grid = Tuple[int, int, int]

# Chunk sizes the paper used for Wan 2.1 1.3B, keyed by latent grid (T, Hg, Wg):
# (temporal_chunk, spatial_chunk, st_chunk).
PAPER_CHUNKS = {
    (21, 30, 52): (3, (5, 13), (7, 5, 13)),  # 81 x 480 x 832
    (24, 36, 64): (3, (6, 8), (8, 12, 8)),  # 93 x 576 x 1024
    (21, 45, 80): (3, (9, 10), (7, 15, 20)),  # 81 x 720 x 1280
}

# Block-count targets for grids outside the table, in the range the paper's table spans.
AUTO_TEMPORAL_BLOCKS = 7
AUTO_SPATIAL_BLOCKS = 32
AUTO_ST_TEMPORAL_BLOCKS = 3
AUTO_ST_SPATIAL_BLOCKS = 16


def _positive_ints(name: str, value, length: int) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool) and length == 1:
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be {length} positive integer(s), got {value!r}") from None
    if len(items) != length or not all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in items
    ):
        raise ValueError(f"{name} must be {length} positive integer(s), got {value!r}")
    return items


def check_grid(grid) -> Grid:
    """Return `grid` as a tuple of three positive ints or raise `ValueError`."""
    return _positive_ints("grid", grid, 3)


@dataclass(frozen=True)
class VMoBAConfig:
    """How VMoBA partitions tokens and selects blocks.

    - `temporal_chunk`: latent frames per 1D block.
    - `spatial_chunk`: `(ch, cw)` latent rows/columns per 2D block (a tile through all frames).
    - `st_chunk`: `(ct, ch, cw)` per 3D block.
    - `layer_kinds`: the cycle of partitions; layer `l` uses `layer_kinds[l % len(layer_kinds)]`.
    - `select`: `"topk"`, `"threshold_query"` or `"threshold_global"`.
    - `threshold`: `tau` for the threshold modes (`>= 1` selects everything, `<= 0` self only).
    - `topk`: blocks per query (self included) for `"topk"`, one number per kind in
      `LAYER_KINDS` order `(1d, 2d, 3d)`, or one int for all kinds.
    """

    temporal_chunk: int = 3
    spatial_chunk: Tuple[int, int] = (5, 13)
    st_chunk: Tuple[int, int, int] = (7, 5, 13)
    layer_kinds: Tuple[str, ...] = LAYER_KINDS
    select: str = "threshold_global"
    threshold: float = 0.25
    topk: Tuple[int, int, int] = field(default=(2, 6, 18))

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("temporal_chunk", _positive_ints("temporal_chunk", self.temporal_chunk, 1)[0])
        set_("spatial_chunk", _positive_ints("spatial_chunk", self.spatial_chunk, 2))
        set_("st_chunk", _positive_ints("st_chunk", self.st_chunk, 3))
        kinds = (self.layer_kinds,) if isinstance(self.layer_kinds, str) else self.layer_kinds
        try:
            kinds = tuple(kinds)
        except TypeError:
            kinds = (kinds,)
        if not kinds or any(k not in LAYER_KINDS for k in kinds):
            raise ValueError(
                f"layer_kinds must be a non-empty sequence of {LAYER_KINDS}, got {self.layer_kinds!r}"
            )
        set_("layer_kinds", kinds)
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {self.select!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold!r}")
        set_("threshold", float(self.threshold))
        topk = self.topk
        if isinstance(topk, int) and not isinstance(topk, bool):
            topk = (topk,) * len(LAYER_KINDS)
        set_("topk", _positive_ints("topk", topk, len(LAYER_KINDS)))

    # -- per layer ----------------------------------------------------------------------------

    def kind(self, layer_idx: int) -> str:
        """The partition kind of layer `layer_idx`."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        return self.layer_kinds[layer_idx % len(self.layer_kinds)]

    def topk_for(self, kind: str) -> int:
        return self.topk[LAYER_KINDS.index(kind)]

    def chunk_for(self, kind: str) -> Tuple[int, int, int]:
        """Chunk sizes `(ct, ch, cw)` of a kind; a dimension a kind does not cut is `None`."""
        if kind == "1d":
            return (self.temporal_chunk, None, None)
        if kind == "2d":
            return (None, *self.spatial_chunk)
        if kind == "3d":
            return self.st_chunk
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")

    def replace(self, **changes) -> "VMoBAConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- chunk choice -------------------------------------------------------------------------

    @classmethod
    def for_grid(cls, grid, **overrides) -> "VMoBAConfig":
        """A config whose chunk sizes suit `grid = (T, Hg, Wg)`.

        The three standard Wan 2.1 grids get the paper's chunks (`PAPER_CHUNKS`). Any other grid
        gets chunks from `auto_chunks`, which aim at the block counts of that table. `overrides`
        set the other fields (or force chunk sizes).
        """
        chunks = dict(zip(("temporal_chunk", "spatial_chunk", "st_chunk"), auto_chunks(grid)))
        chunks.update(overrides)
        return cls(**chunks)


def _split(length: int, blocks: int) -> int:
    """Chunk size that cuts `length` into about `blocks` pieces (at least 1, at most `length`)."""
    blocks = max(1, min(blocks, length))
    return math.ceil(length / blocks)


def _tile(hg: int, wg: int, target: int) -> Tuple[int, int]:
    """`(ch, cw)` cutting an `hg x wg` plane into about `target` tiles of near-square shape."""
    n_h = max(1, round(math.sqrt(target * hg / wg)))
    n_w = max(1, round(target / n_h))
    return _split(hg, n_h), _split(wg, n_w)


def auto_chunks(grid) -> tuple:
    """Deterministic chunk sizes `(temporal_chunk, spatial_chunk, st_chunk)` for any grid.

    Standard Wan grids return the paper's table. Otherwise:
    - 1D: about `AUTO_TEMPORAL_BLOCKS` (7) temporal slabs;
    - 2D: about `AUTO_SPATIAL_BLOCKS` (32) near-square spatial tiles;
    - 3D: about `AUTO_ST_TEMPORAL_BLOCKS` (3) temporal pieces times `AUTO_ST_SPATIAL_BLOCKS` (16)
      near-square tiles, i.e. about 48 cuboids.
    Each count is clipped to what the grid allows (a dimension of 1 gives one block along it).
    """
    t, hg, wg = check_grid(grid)
    if (t, hg, wg) in PAPER_CHUNKS:
        return PAPER_CHUNKS[(t, hg, wg)]
    temporal = _split(t, AUTO_TEMPORAL_BLOCKS)
    spatial = _tile(hg, wg, AUTO_SPATIAL_BLOCKS)
    st = (_split(t, AUTO_ST_TEMPORAL_BLOCKS), *_tile(hg, wg, AUTO_ST_SPATIAL_BLOCKS))
    return temporal, spatial, st
