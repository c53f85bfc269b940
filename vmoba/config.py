"""VMoBA settings, validated on construction; torch-free, so an HTTP layer can import it.

- `VMoBAConfig`: how each layer kind cuts the latent video grid `(T, Hg, Wg)` into blocks and how
  queries select key blocks (see `docs/vmoba.md` sections 2 and 4 for the semantics).
- `AttentionSettings`: one job's attention settings (a request's `attention` object): VMoBA or
  dense, the selection, the dense steps, the kernel; `vmoba_config(grid)` gives its `VMoBAConfig`.
- `merge_attention_settings`: model defaults, operator defaults and a request's values merged
  into one `AttentionSettings`, with where each field came from.
- The choices and defaults below are the single source of truth for every layer that exposes
  these settings (HTTP schema, worker settings, command line).

"backend" means one thing everywhere: VMoBA (sparse) or dense attention. The implementation of
`vmoba_attention` is the "kernel".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

LAYER_KINDS = ("1d", "2d", "3d")
SELECT_MODES = ("topk", "threshold_query", "threshold_global")
# `AttentionSettings.backend`: sparse VMoBA or stock attention
ATTENTION_BACKENDS = ("vmoba", "dense")
KERNELS = ("auto", "triton", "reference")  # `kernel=` of `vmoba_attention` / `select_blocks`

DEFAULT_BACKEND = "vmoba"
DEFAULT_SELECT = "threshold_global"  # the paper's
DEFAULT_THRESHOLD = 0.25  # tau of the threshold modes
DEFAULT_TOPK = (2, 6, 18)  # blocks per query (self included) for (1d, 2d, 3d), the paper's at 480p
DEFAULT_DENSE_STEPS = 0.25  # the paper runs the first 25% of the denoising steps dense
DEFAULT_KERNEL = "auto"

Grid = tuple[int, int, int]

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
    spatial_chunk: tuple[int, int] = (5, 13)
    st_chunk: tuple[int, int, int] = (7, 5, 13)
    layer_kinds: tuple[str, ...] = LAYER_KINDS
    select: str = DEFAULT_SELECT
    threshold: float = DEFAULT_THRESHOLD
    topk: tuple[int, int, int] = field(default=DEFAULT_TOPK)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("temporal_chunk", _positive_ints("temporal_chunk", self.temporal_chunk, 1)[0])
        set_("spatial_chunk", _positive_ints("spatial_chunk", self.spatial_chunk, 2))
        set_("st_chunk", _positive_ints("st_chunk", self.st_chunk, 3))
        # whatever the caller passed: one kind as a str, an iterable of kinds, or one value
        kinds: Any = (self.layer_kinds,) if isinstance(self.layer_kinds, str) else self.layer_kinds
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

    def chunk_for(self, kind: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
        """Chunk sizes `(ct, ch, cw)` of a kind; a dimension a kind does not cut is `None`."""
        if kind == "1d":
            return (self.temporal_chunk, None, None)
        if kind == "2d":
            return (None, *self.spatial_chunk)
        if kind == "3d":
            return self.st_chunk
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")

    def replace(self, **changes) -> VMoBAConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- chunk choice -------------------------------------------------------------------------

    @classmethod
    def for_grid(cls, grid, **overrides) -> VMoBAConfig:
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


def _tile(hg: int, wg: int, target: int) -> tuple[int, int]:
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


# -- per-job attention settings -------------------------------------------------------------------

# `int(dense_steps * num_steps)` with a little slack, so that e.g. 0.29 * 100 (28.999...96 in
# floating point) counts 29 dense steps, as a person reading the setting expects.
_CUTOFF_EPS = 1e-9


@dataclass(frozen=True)
class AttentionSettings:
    """One job's attention settings (a request's `attention` object), validated on construction.

    - `backend`: `"vmoba"` (sparse after the dense steps) or `"dense"` (stock attention for the
      whole call).
    - `select`, `threshold`, `topk`: the selection (`docs/vmoba.md` section 4); `topk` is one int
      or one per layer kind `(1d, 2d, 3d)`.
    - `dense_steps`: fraction in `[0, 1]` of denoising steps run dense: steps
      `0 .. int(dense_steps * num_steps) - 1` (the paper keeps the first 25%).
    - `temporal_chunk`, `spatial_chunk`, `st_chunk`: `None` (default) picks chunks for the
      grid with `VMoBAConfig.for_grid` (the paper's table for the standard Wan grids); a value
      forces that chunk.
    - `kernel`: `"auto" | "triton" | "reference"`, passed as `kernel=` to `vmoba_attention`.
    - `collect_timing`: time the attention op of every self-attention call (host syncs once at
      the end of the call; CUDA events, so the kernels still run back to back).
    - `collect_density`: report the achieved density (the attention op counts the attended
      tokens on the device as it selects; one host read at the end of the call).
    - `collect_drift`: report how far the sparse output is from dense attention (`vmoba.drift`:
      relative L2 error and softmax mass kept on sampled query rows, per layer kind and step).
      Off by default: it costs dense attention for the sampled rows and a second selection
      per sparse call (on the device, no host sync until the end of the call).

    Bad values raise `ValueError` naming the field.
    """

    backend: str = DEFAULT_BACKEND
    select: str = DEFAULT_SELECT
    threshold: float = DEFAULT_THRESHOLD
    topk: tuple[int, int, int] = DEFAULT_TOPK
    dense_steps: float = DEFAULT_DENSE_STEPS
    temporal_chunk: Optional[int] = None
    spatial_chunk: Optional[tuple[int, int]] = None
    st_chunk: Optional[tuple[int, int, int]] = None
    kernel: str = DEFAULT_KERNEL
    collect_timing: bool = False
    collect_density: bool = True
    collect_drift: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 <= d <= 1.0):
            raise ValueError(f"dense_steps must be a number in [0, 1], got {d!r}")
        set_("dense_steps", float(d))
        for name in ("collect_timing", "collect_density", "collect_drift"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # VMoBAConfig validates and normalises the selection fields and explicit chunks (lists
        # from JSON become tuples, one topk int becomes three); its errors name the field.
        probe = VMoBAConfig(
            select=self.select, threshold=self.threshold, topk=self.topk, **self.chunks
        )
        set_("threshold", probe.threshold)
        set_("topk", probe.topk)
        for name in self.chunks:
            set_(name, getattr(probe, name))

    @property
    def chunks(self) -> dict:
        """The chunk sizes given explicitly (the others are chosen for the grid)."""
        names = ("temporal_chunk", "spatial_chunk", "st_chunk")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def vmoba_config(self, grid) -> VMoBAConfig:
        """The `VMoBAConfig` these settings give on `grid = (T, Hg, Wg)` (cached)."""
        return _config_for(self, tuple(grid))

    def dense_cutoff(self, num_steps: int) -> int:
        """Steps `0 .. cutoff - 1` of a `num_steps`-step call run dense."""
        return int(self.dense_steps * num_steps + _CUTOFF_EPS)

    def replace(self, **changes) -> AttentionSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data) -> AttentionSettings:
        """Settings from a JSON object; missing or `null` fields take their defaults."""
        if data is None:
            return cls()
        if isinstance(data, AttentionSettings):
            return data
        return cls(**_set_fields(data))

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists) that `from_dict` reads back."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@functools.lru_cache(maxsize=256)
def _config_for(settings: AttentionSettings, grid) -> VMoBAConfig:
    return VMoBAConfig.for_grid(
        grid,
        select=settings.select,
        threshold=settings.threshold,
        topk=settings.topk,
        **settings.chunks,
    )


def _set_fields(data, source: Optional[str] = None) -> dict:
    """The fields a JSON object sets (`null` = not set); unknown names raise `ValueError`."""
    what = f"the {source} attention settings" if source else "attention settings"
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be an object, got {type(data).__name__}")
    names = AttentionSettings.field_names()
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" in {what}" if source else ""
        raise ValueError(f"unknown attention setting(s) {unknown}{where}; allowed: {list(names)}")
    return {k: v for k, v in data.items() if v is not None}


# where a merged field's value came from, lowest precedence first
SETTING_SOURCES = ("default", "model", "operator", "request")


def merge_attention_settings(
    model_defaults: Optional[Mapping] = None,
    operator_defaults: Optional[Mapping] = None,
    request: Optional[Mapping] = None,
) -> tuple[AttentionSettings, dict]:
    """One job's settings from three layers of JSON-style objects; a later layer wins.

    `model_defaults` (what suits the model), `operator_defaults` (the deployment's choice, e.g. the
    kernel), `request` (the job's own `attention` object). A missing or `null` field does not set
    anything; fields no layer sets take the `AttentionSettings` defaults. The merged values are
    validated once.

    Returns `(settings, sources)`: `sources` maps every field to the layer its value came from,
    `"model"`, `"operator"`, `"request"` or `"default"`. Raises `ValueError` naming the field (and
    the layer that set it) for a bad value, or naming unknown fields and their layer.
    """
    merged, sources = {}, dict.fromkeys(AttentionSettings.field_names(), "default")
    for source, layer in zip(SETTING_SOURCES[1:], (model_defaults, operator_defaults, request)):
        if layer is None:
            continue
        values = _set_fields(layer, source)
        merged.update(values)
        sources.update(dict.fromkeys(values, source))
    try:
        settings = AttentionSettings(**merged)
    except ValueError as exc:
        bad = next((name for name in sources if re.match(rf"{name}\b", str(exc))), None)
        if bad is None or sources[bad] == "default":
            raise
        raise ValueError(f"{exc} (set by the {sources[bad]} attention settings)") from None
    return settings, sources


# -- a config as the plain values of a custom op's arguments (`vmoba.ops`, `vmoba.autograd`) ----


def config_args(config: VMoBAConfig) -> tuple:
    """`config` as the ops' plain arguments `(chunks, select, threshold, topk)`, in their order
    after `grid, kind`; `config_from_args` takes them back."""
    chunks = [config.temporal_chunk, *config.spatial_chunk, *config.st_chunk]
    return chunks, config.select, config.threshold, list(config.topk)


def config_from_args(chunks, select: str, threshold: float, topk) -> VMoBAConfig:
    t, sh, sw, ct, ch, cw = chunks
    return VMoBAConfig(
        temporal_chunk=t,
        spatial_chunk=(sh, sw),
        st_chunk=(ct, ch, cw),
        select=select,
        threshold=threshold,
        topk=tuple(topk),
    )
