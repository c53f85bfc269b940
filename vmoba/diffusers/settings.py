"""The settings a VMoBA call accepts: `AttentionSettings`, validated on construction, given as an
instance, a JSON-style dict or `None`, plus field overrides."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ..config import VMoBAConfig

ATTENTION_BACKENDS = ("vmoba", "dense")
KERNELS = ("auto", "triton", "reference")  # `backend=` of vmoba_attention

# `int(dense_steps * num_steps)` with a little slack, so that e.g. 0.29 * 100 (28.999...96 in
# floating point) counts 29 dense steps, as a person reading the setting expects.
_CUTOFF_EPS = 1e-9


@dataclass(frozen=True)
class AttentionSettings:
    """Per-call VMoBA settings (a request's `attention` object), validated on construction.

    - `backend`: `"vmoba"` (sparse after the dense steps) or `"dense"` (stock attention for the
      whole call).
    - `select`, `threshold`, `topk`: the selection (design note, section 4); `topk` is one int
      or one per layer kind `(1d, 2d, 3d)`.
    - `dense_steps`: fraction in `[0, 1]` of denoising steps run dense: steps
      `0 .. int(dense_steps * num_steps) - 1` (the paper keeps the first 25%).
    - `temporal_chunk`, `spatial_chunk`, `st_chunk`: `None` (default) picks chunks for the
      grid with `VMoBAConfig.for_grid` (the paper's table for the standard Wan grids); a value
      forces that chunk.
    - `kernel`: `"auto" | "triton" | "reference"`, passed as `backend=` to `vmoba_attention`.
    - `collect_timing`: time the attention op of every self-attention call (host syncs once at
      the end of the call; CUDA events, so the kernels still run back to back).
    - `collect_density`: report the achieved density (the attention op counts the attended
      tokens on the device as it selects; one host read at the end of the call).

    Bad values raise `ValueError` naming the field.
    """

    backend: str = "vmoba"
    select: str = "threshold_global"
    threshold: float = 0.25
    topk: Tuple[int, int, int] = (2, 6, 18)
    dense_steps: float = 0.25
    temporal_chunk: Optional[int] = None
    spatial_chunk: Optional[Tuple[int, int]] = None
    st_chunk: Optional[Tuple[int, int, int]] = None
    kernel: str = "auto"
    collect_timing: bool = False
    collect_density: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 <= d <= 1.0):
            raise ValueError(f"dense_steps must be a number in [0, 1], got {d!r}")
        set_("dense_steps", float(d))
        for name in ("collect_timing", "collect_density"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # VMoBAConfig validates and normalises the selection fields and explicit chunks (lists
        # from JSON become tuples, one topk int becomes three); its errors name the field.
        probe = VMoBAConfig(select=self.select, threshold=self.threshold, topk=self.topk, **self.chunks)
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

    def replace(self, **changes) -> "AttentionSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data) -> "AttentionSettings":
        """Settings from a JSON object; missing or `null` fields take their defaults."""
        if data is None:
            return cls()
        if isinstance(data, AttentionSettings):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"attention settings must be an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown attention setting(s) {unknown}; allowed: {names}")
        return cls(**{k: v for k, v in data.items() if v is not None})

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
        grid, select=settings.select, threshold=settings.threshold, topk=settings.topk, **settings.chunks
    )


def coerce_settings(settings, overrides: dict) -> AttentionSettings:
    """`settings` (`AttentionSettings`, dict or `None` for the defaults) with `overrides` applied."""
    if settings is None:
        settings = AttentionSettings()
    elif not isinstance(settings, AttentionSettings):
        settings = AttentionSettings.from_dict(settings)
    return settings.replace(**overrides) if overrides else settings
