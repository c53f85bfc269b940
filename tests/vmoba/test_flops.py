import pytest
import torch

from vmoba import VMoBAConfig, select_blocks
from vmoba.flops import WAN_1_3B, density, full_attention_flops, selection_flops, wan_forward_flops
from vmoba.inputs import locality_qkv
from vmoba.partition import block_layout


@pytest.mark.parametrize("tokens,tflops", [(13_440, 67.73), (55_296, 705.02), (75_600, 1246.79)])
def test_wan_1_3b_full_attention_totals_match_the_paper(tokens, tflops):
    assert round(wan_forward_flops(tokens) / 1e12, 2) == tflops


def test_density_and_selection_flops_match_brute_force(seed):
    grid = (3, 5, 7)
    cfg = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 3, 4))
    q, k, _ = locality_qkv(grid, 2, 3, 8)
    sel = select_blocks(q, k, grid=grid, layer_idx=1, config=cfg)
    lay = block_layout(grid, "2d", cfg)
    token_mask = sel[..., lay.ids]  # [B, H, S, S]
    s = 105
    assert density(sel, lay.lengths) == pytest.approx(token_mask.double().mean().item())
    attended = token_mask.sum().item()
    expected = 2 * (2 * s * 24 * lay.num_blocks) + 4 * 24 * attended / 3
    assert selection_flops(sel, lay.lengths, 24) == pytest.approx(expected)
    full = torch.ones_like(sel)
    assert density(full, lay.lengths) == pytest.approx(1.0)
    assert full_attention_flops(s, 24) == 4 * s * s * 24


def test_sparse_model_flops_below_dense():
    dense = wan_forward_flops(75_600)
    sparse = wan_forward_flops(75_600, densities=[(0.2, 40)] * WAN_1_3B.num_layers)
    assert dense / sparse > 2.0
    with pytest.raises(ValueError, match="layers"):
        wan_forward_flops(75_600, densities=[(0.2, 40)])
