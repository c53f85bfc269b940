"""Argument checks at the public boundary: `ValueError`s that name the bad value."""

from __future__ import annotations

import math

import torch

from .config import VMoBAConfig, check_grid

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, S, H, D] (4 dims), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def check_inputs(grid, layer_idx, config, q, k, v=None) -> tuple:
    """Validate the common arguments; return `grid` as a tuple of ints."""
    if not isinstance(config, VMoBAConfig):
        raise ValueError(f"config must be a VMoBAConfig, got {type(config).__name__}")
    config.kind(layer_idx)  # validates layer_idx
    grid = check_grid(grid)
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        check_tensor(name, x)
    for name, x in named[1:]:
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but q has {tuple(q.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    s = q.shape[1]
    if math.prod(grid) != s:
        raise ValueError(
            f"grid {grid} has {math.prod(grid)} tokens but q has {s} (q is [B, S, H, D])"
        )
    return grid


def resolve_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a number or None, got {softmax_scale!r}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return float(softmax_scale)
