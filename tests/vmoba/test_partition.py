import math

import pytest
import torch

from vmoba import VMoBAConfig, block_ids, num_blocks
from vmoba.config import PAPER_CHUNKS, auto_chunks
from vmoba.partition import block_layout

CFG = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 2), st_chunk=(2, 2, 2))


def members(ids, block):
    return ids.eq(block).nonzero().view(-1).tolist()


def test_worked_example_4x4x4():
    ids1 = block_ids((4, 4, 4), "1d", CFG)
    assert members(ids1, 0) == list(range(32)) and members(ids1, 1) == list(range(32, 64))
    ids2 = block_ids((4, 4, 4), "2d", CFG)
    assert members(ids2, 0) == [0, 1, 4, 5, 16, 17, 20, 21, 32, 33, 36, 37, 48, 49, 52, 53]
    assert members(ids2, 3) == [10, 11, 14, 15, 26, 27, 30, 31, 42, 43, 46, 47, 58, 59, 62, 63]
    ids3 = block_ids((4, 4, 4), "3d", CFG)
    assert members(ids3, 0) == [0, 1, 4, 5, 16, 17, 20, 21]
    assert members(ids3, 7) == [42, 43, 46, 47, 58, 59, 62, 63]


def test_ragged_temporal_block():
    ids = block_ids((5, 4, 4), "1d", CFG)
    assert num_blocks((5, 4, 4), "1d", CFG) == 3
    assert members(ids, 2) == list(range(64, 80))


def _brute_force(grid, kind, cfg):
    t, hg, wg = grid
    ct, ch, cw = cfg.chunk_for(kind)
    ct, ch, cw = ct or t, ch or hg, cw or wg
    n_h, n_w = math.ceil(hg / ch), math.ceil(wg / cw)
    out = []
    for ti in range(t):
        for hi in range(hg):
            for wi in range(wg):
                if kind == "1d":
                    out.append(ti // ct)
                elif kind == "2d":
                    out.append((hi // ch) * n_w + wi // cw)
                else:
                    out.append(((ti // ct) * n_h + hi // ch) * n_w + wi // cw)
    return out


@pytest.mark.parametrize("grid", [(3, 5, 7), (5, 4, 4), (1, 1, 1), (2, 9, 3), (7, 2, 11)])
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_every_token_in_exactly_one_block(grid, kind):
    cfg = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(3, 2, 4))
    ids = block_ids(grid, kind, cfg)
    assert ids.tolist() == _brute_force(grid, kind, cfg)
    c = num_blocks(grid, kind, cfg)
    counts = torch.bincount(ids, minlength=c)
    assert counts.numel() == c and counts.min() >= 1 and counts.sum() == math.prod(grid)


def test_chunk_larger_than_grid_gives_one_block_per_dimension():
    cfg = VMoBAConfig(temporal_chunk=50, spatial_chunk=(50, 2), st_chunk=(50, 50, 50))
    assert num_blocks((3, 5, 7), "1d", cfg) == 1
    assert num_blocks((3, 5, 7), "2d", cfg) == 4
    assert num_blocks((3, 5, 7), "3d", cfg) == 1
    assert block_ids((3, 5, 7), "3d", cfg).eq(0).all()


def test_layout_permutation_makes_blocks_contiguous():
    cfg = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(3, 2, 4))
    for kind in ("1d", "2d", "3d"):
        lay = block_layout((3, 5, 7), kind, cfg)
        sorted_ids = lay.ids[lay.perm.long()]
        assert torch.equal(sorted_ids, torch.sort(lay.ids).values)
        assert torch.equal(lay.inv_perm.long()[lay.perm.long()], torch.arange(105))
        for c in range(lay.num_blocks):
            seg = sorted_ids[lay.starts[c] : lay.starts[c] + lay.lengths[c]]
            assert seg.eq(c).all() and seg.numel() == lay.lengths[c]
        assert lay.max_len == int(lay.lengths.max())


@pytest.mark.parametrize(
    "grid,blocks",
    [((21, 30, 52), (7, 24, 72)), ((24, 36, 64), (8, 48, 72)), ((21, 45, 80), (7, 40, 36))],
)
def test_paper_table_reproduced(grid, blocks):
    cfg = VMoBAConfig.for_grid(grid)
    assert (cfg.temporal_chunk, cfg.spatial_chunk, cfg.st_chunk) == PAPER_CHUNKS[grid]
    assert tuple(num_blocks(grid, k, cfg) for k in ("1d", "2d", "3d")) == blocks


@pytest.mark.parametrize(
    "grid", [(16, 30, 52), (21, 60, 104), (31, 34, 60), (13, 40, 40), (21, 52, 30)]
)
def test_auto_chunks_near_paper_block_counts(grid):
    cfg = VMoBAConfig.for_grid(grid, select="topk")
    assert cfg.select == "topk"
    n1, n2, n3 = (num_blocks(grid, k, cfg) for k in ("1d", "2d", "3d"))
    assert 5 <= n1 <= 9
    assert 20 <= n2 <= 48
    assert 30 <= n3 <= 80
    assert auto_chunks(grid) == auto_chunks(grid)  # deterministic


def test_auto_chunks_small_grid_clips():
    cfg = VMoBAConfig.for_grid((1, 2, 2))
    assert all(num_blocks((1, 2, 2), k, cfg) >= 1 for k in ("1d", "2d", "3d"))
    assert num_blocks((1, 2, 2), "1d", cfg) == 1
