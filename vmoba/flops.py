"""FLOPs and density accounting (`docs/vmoba.md` section 8).

Per self-attention layer, forward, all heads, `D_model = H*D`, one sample:
- full attention: `4 * S^2 * D_model` (QK^T and PV, 2 FLOPs per multiply-add);
- VMoBA: `2 * S * D_model * C` (the gate) `+ 4 * D_model * sum_{h,i} |K(h,i)| / H`,
  where `|K(h,i)|` is the number of key tokens query `i` of head `h` attends to.
Density `rho = sum |K| / (H * S^2)`.

`wan_forward_flops` counts a whole Wan DiT forward (matmuls only), which reproduces the paper's
full-attention totals for Wan 2.1 1.3B at text length 300: 67.73T (13,440 tokens), 705.02T
(55,296) and 1,246.79T (75,600).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def attended_tokens(selected: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`|K(b,h,i)|` for a selection. `selected [B, H, S, C]` bool, `lengths [C]` -> `[B, H, S]`."""
    return (selected.to(torch.float64) * lengths.to(selected.device, torch.float64)).sum(-1)


def density(selected: torch.Tensor, lengths: torch.Tensor) -> float:
    """Fraction of the `S x S` score matrix a selection computes, averaged over samples/heads."""
    s = selected.shape[2]
    return float(
        attended_tokens(selected, lengths).sum() / (selected.shape[0] * selected.shape[1] * s * s)
    )


def full_attention_flops(tokens: int, d_model: int) -> float:
    """Dense self-attention FLOPs of one layer, one sample."""
    return 4.0 * tokens * tokens * d_model


def vmoba_attention_flops(tokens: int, d_model: int, num_blocks: int, rho: float) -> float:
    """VMoBA FLOPs of one layer, one sample, at density `rho` with `num_blocks` blocks."""
    return 2.0 * tokens * d_model * num_blocks + rho * full_attention_flops(tokens, d_model)


def selection_flops(selected: torch.Tensor, lengths: torch.Tensor, d_model: int) -> float:
    """VMoBA FLOPs of one layer for an actual selection `[B, H, S, C]`, summed over samples."""
    b, h, s, c = selected.shape
    attended = float(attended_tokens(selected, lengths).sum())
    return b * 2.0 * s * d_model * c + 4.0 * d_model * attended / h


@dataclass(frozen=True)
class WanArch:
    """The sizes of a Wan DiT that set its FLOPs."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30


WAN_1_3B = WanArch()
WAN_14B = WanArch(dim=5120, ffn_dim=13824, num_layers=40)


def wan_forward_flops(
    tokens: int, text_len: int = 300, arch: WanArch = WAN_1_3B, densities=None
) -> float:
    """Whole-model forward FLOPs of a Wan DiT at batch 1 (matmuls of the transformer blocks).

    Per block: self-attention projections `8 S d^2`, self-attention `4 S^2 d` (times the layer's
    density when `densities` gives one per layer; the gate is added then), cross-attention
    projections `4 S d^2 + 4 L d^2`, cross-attention `4 S L d`, feed-forward `4 S d f`.
    `densities`: `None` (dense) or a sequence of `(rho, num_blocks)` per layer.
    """
    s, d, f, length = tokens, arch.dim, arch.ffn_dim, text_len
    other = 8 * s * d * d + 4 * s * d * d + 4 * length * d * d + 4 * s * length * d + 4 * s * d * f
    if densities is None:
        return float(arch.num_layers * (other + full_attention_flops(s, d)))
    if len(densities) != arch.num_layers:
        raise ValueError(
            f"densities has {len(densities)} entries, the model has {arch.num_layers} layers"
        )
    return float(sum(other + vmoba_attention_flops(s, d, c, rho) for rho, c in densities))
