"""The reference VMoBA against the contract (`docs/vmoba.md` sections 2-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vmoba import VMoBAConfig, block_ids, num_blocks, reference, select_blocks, vmoba_attention
from vmoba.inputs import locality_qkv

MODES = ("topk", "threshold_query", "threshold_global")
GRIDS = [(3, 5, 7), (5, 4, 4), (4, 6, 6)]
CFG = VMoBAConfig(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 3, 4), topk=(2, 3, 5))


def inputs(grid, b=2, h=3, d=16, dtype=torch.float64):
    return locality_qkv(grid, b, h, d, dtype=dtype)


def gates_and_norm(q, k, grid, layer, cfg, mode):
    kind = cfg.kind(layer)
    ids = block_ids(grid, kind, cfg)
    g = reference.gate(q, k, ids, num_blocks(grid, kind, cfg))
    dims = -1 if mode == "threshold_query" else (-2, -1)
    return ids, g, reference.normalise(g, dims)


def self_mask(ids, shape):
    return torch.zeros(shape, dtype=torch.bool).scatter_(
        -1, ids.view(1, 1, -1, 1).expand(*shape[:3], 1), True
    )


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_selection_properties(seed, grid, layer, mode):
    tau = float(torch.empty(()).uniform_(0.1, 0.7))
    cfg = CFG.replace(select=mode, threshold=tau)
    q, k, _ = inputs(grid)
    sel = select_blocks(q, k, grid=grid, layer_idx=layer, config=cfg)
    ids, g, n = gates_and_norm(q, k, grid, layer, cfg, mode)
    assert sel.shape == g.shape and sel.dtype == torch.bool
    smask = self_mask(ids, g.shape)
    assert sel[smask].all(), "self block must always be selected"
    others_sel, others_un = sel & ~smask, ~sel & ~smask
    c = g.shape[-1]
    if mode == "topk":
        assert (sel.sum(-1) == min(cfg.topk_for(cfg.kind(layer)), c)).all()
        worst_taken = torch.where(others_sel, g, math.inf).amin(-1)
        best_left = torch.where(others_un, g, -math.inf).amax(-1)
        assert (worst_taken >= best_left).all(), "taken blocks must be a best-first prefix"
    elif mode == "threshold_query":
        worst_taken = torch.where(others_sel, n, math.inf).amin(-1)
        best_left = torch.where(others_un, n, -math.inf).amax(-1)
        assert (worst_taken >= best_left).all()
        mass = (n * sel).sum(-1)
        target = tau * n.sum(-1)
        assert (mass >= target - 1e-9).all(), "threshold mass must be reached"
        # minimal: without its worst taken block, a query falls short
        has_other = others_sel.any(-1)
        assert ((mass - worst_taken)[has_other] < target[has_other]).all()
    else:
        worst_taken = torch.where(others_sel, n, math.inf).amin((-2, -1))
        best_left = torch.where(others_un, n, -math.inf).amax((-2, -1))
        assert (worst_taken >= best_left).all()
        mass = (n * sel).sum((-2, -1))
        target = tau * n.sum((-2, -1))
        assert (mass >= target - 1e-9).all()
        has_other = others_sel.any(-1).any(-1)
        assert ((mass - worst_taken)[has_other] < target[has_other]).all()
        if c >= 6 and tau > 0.3:
            assert has_other.any(), "test inputs should need more than self blocks"


@pytest.mark.parametrize("mode", ["threshold_query", "threshold_global"])
def test_threshold_monotone_and_limits(seed, mode):
    grid = (3, 5, 7)
    q, k, _ = inputs(grid)
    prev = None
    for tau in (-0.5, 0.0, 0.05, 0.2, 0.4, 0.7, 0.95, 1.0, 3.0):
        sel = select_blocks(
            q, k, grid=grid, layer_idx=2, config=CFG.replace(select=mode, threshold=tau)
        )
        if prev is not None:
            assert (sel | ~prev).all(), f"tau={tau} dropped a block selected at a smaller tau"
        prev = sel
        ids = block_ids(grid, "3d", CFG)
        if tau <= 0:
            assert torch.equal(sel, self_mask(ids, sel.shape))
        if tau >= 1:
            assert sel.all()


def test_topk_clipped_to_block_count(seed):
    grid = (3, 5, 7)
    q, k, _ = inputs(grid)
    sel = select_blocks(q, k, grid=grid, layer_idx=0, config=CFG.replace(select="topk", topk=50))
    assert sel.all()


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_isolation(seed, mode):
    grid = (4, 6, 6)
    q, k, _ = inputs(grid, b=2)
    cfg = CFG.replace(select=mode, threshold=0.3)
    base = select_blocks(q, k, grid=grid, layer_idx=1, config=cfg)
    q2, k2 = q.clone(), k.clone()
    q2[1] = torch.randn_like(q2[1]) * 5
    k2[1] = torch.randn_like(k2[1]) * 5
    changed = select_blocks(q2, k2, grid=grid, layer_idx=1, config=cfg)
    assert torch.equal(base[0], changed[0])
    alone = select_blocks(q[:1], k[:1], grid=grid, layer_idx=1, config=cfg)
    assert torch.equal(base[0], alone[0])


def test_ties_go_to_lower_block_index(seed):
    # every key equal: all gates tie, so top-k takes self plus the lowest other indices
    grid = (4, 4, 4)
    cfg = VMoBAConfig(
        temporal_chunk=1, spatial_chunk=(2, 2), st_chunk=(2, 2, 2), select="topk", topk=2
    )
    q = torch.randn(1, 64, 1, 8, dtype=torch.float64)
    k = torch.ones(1, 64, 1, 8, dtype=torch.float64)
    sel = select_blocks(q, k, grid=grid, layer_idx=0, config=cfg)
    ids = block_ids(grid, "1d", cfg)
    expected_other = torch.where(ids == 0, 1, 0)
    for i in range(64):
        assert sel[0, 0, i].nonzero().view(-1).tolist() == sorted(
            {int(ids[i]), int(expected_other[i])}
        )


def test_degenerate_gates_normalise_to_one():
    grid = (2, 2, 2)
    cfg = VMoBAConfig(
        temporal_chunk=1,
        spatial_chunk=(1, 1),
        st_chunk=(1, 1, 1),
        select="threshold_global",
        threshold=0.5,
    )
    q = torch.ones(1, 8, 1, 4, dtype=torch.float64)
    k = torch.ones(1, 8, 1, 4, dtype=torch.float64)
    # all n == 1: need tau * (S*C) = 32 pairs, 8 are self pairs, so 24 others, by block then query
    sel = select_blocks(q, k, grid=grid, layer_idx=2, config=cfg)
    assert int(sel.sum()) == 32
    # with one block per token (self(i) == i), blocks 0..2 are taken whole and block 3 by queries 0..2
    expected = torch.eye(8, dtype=torch.bool)
    expected[:, :3] = True
    expected[:3, 3] = True
    assert torch.equal(sel[0, 0], expected)
    g = reference.gate(q, k, block_ids(grid, "3d", cfg), 8)
    assert torch.equal(reference.normalise(g, (-2, -1)), torch.ones_like(g))


def dense_masked(q, k, v, sel, ids, scale):
    """Independent twin: SDPA with a boolean token mask."""
    allowed = sel[:, :, :, ids]  # [B, H, S, S]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", MODES)
def test_attention_equals_masked_dense(seed, grid, mode):
    cfg = CFG.replace(select=mode, threshold=0.3)
    q, k, v = inputs(grid, dtype=torch.float64)
    for layer in range(3):
        out = vmoba_attention(q, k, v, grid=grid, layer_idx=layer, config=cfg, kernel="reference")
        sel = select_blocks(q, k, grid=grid, layer_idx=layer, config=cfg)
        ids = block_ids(grid, cfg.kind(layer), cfg)
        ref = dense_masked(q, k, v, sel, ids, 1 / math.sqrt(q.shape[-1]))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_query_chunking_does_not_change_result(seed):
    grid = (3, 5, 7)
    q, k, v = inputs(grid)
    sel = select_blocks(q, k, grid=grid, layer_idx=1, config=CFG)
    ids = block_ids(grid, "2d", CFG)
    a = reference.masked_attention(q, k, v, sel, ids, 0.3, query_chunk=7)
    b = reference.masked_attention(q, k, v, sel, ids, 0.3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
)
def test_all_selected_equals_sdpa(seed, dtype, tol):
    grid = (3, 5, 7)
    q, k, v = (x.to(dtype) for x in inputs(grid, dtype=torch.float32))
    for mode, extra in (
        ("threshold_global", {"threshold": 1.0}),
        ("threshold_query", {"threshold": 1.5}),
        ("topk", {"topk": 1000}),
    ):
        out = vmoba_attention(
            q,
            k,
            v,
            grid=grid,
            layer_idx=2,
            config=CFG.replace(select=mode, **extra),
            kernel="reference",
        )
        assert out.dtype == dtype
        ref = F.scaled_dot_product_attention(
            *(x.float().transpose(1, 2) for x in (q, k, v))
        ).transpose(1, 2)
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_small_tau_differs_from_dense(seed):
    grid = (4, 6, 6)
    q, k, v = inputs(grid, dtype=torch.float32)
    out = vmoba_attention(q, k, v, grid=grid, layer_idx=1, config=CFG.replace(threshold=0.05))
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() > 1e-2


def test_softmax_scale_is_used(seed):
    grid = (3, 5, 7)
    q, k, v = inputs(grid, dtype=torch.float32)
    a = vmoba_attention(q, k, v, grid=grid, layer_idx=0, config=CFG, softmax_scale=0.1)
    b = vmoba_attention(q, k, v, grid=grid, layer_idx=0, config=CFG, softmax_scale=1.0)
    assert not torch.allclose(a, b)


def test_bad_arguments_raise_value_errors(seed):
    grid = (3, 5, 7)
    q, k, v = inputs(grid, dtype=torch.float32)
    with pytest.raises(ValueError, match="grid"):
        vmoba_attention(q, k, v, grid=(3, 5, 8), layer_idx=0, config=CFG)
    with pytest.raises(ValueError, match="grid"):
        vmoba_attention(q, k, v, grid=(3, 5), layer_idx=0, config=CFG)
    with pytest.raises(ValueError, match="dtype|float"):
        vmoba_attention(q.long(), k.long(), v.long(), grid=grid, layer_idx=0, config=CFG)
    with pytest.raises(ValueError, match="shape"):
        vmoba_attention(q, k[:, :-1], v, grid=grid, layer_idx=0, config=CFG)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        vmoba_attention(q[0], k[0], v[0], grid=grid, layer_idx=0, config=CFG)
    with pytest.raises(ValueError, match="layer_idx"):
        vmoba_attention(q, k, v, grid=grid, layer_idx=-1, config=CFG)
    with pytest.raises(ValueError, match="kernel"):
        vmoba_attention(q, k, v, grid=grid, layer_idx=0, config=CFG, kernel="cuda")
    with pytest.raises(
        TypeError, match="backend"
    ):  # `backend` means vmoba vs dense; the implementation is `kernel`
        vmoba_attention(q, k, v, grid=grid, layer_idx=0, config=CFG, backend="reference")
    with pytest.raises(ValueError, match="softmax_scale"):
        vmoba_attention(q, k, v, grid=grid, layer_idx=0, config=CFG, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="config"):
        select_blocks(q, k, grid=grid, layer_idx=0, config={"select": "topk"})
    with pytest.raises(ValueError, match="dtype"):
        vmoba_attention(q, k.double(), v, grid=grid, layer_idx=0, config=CFG)


def test_stats_report_attended_tokens_without_a_second_selection(seed):
    grid = (3, 5, 7)
    q, k, v = inputs(grid, dtype=torch.float32)
    stats = {}
    vmoba_attention(q, k, v, grid=grid, layer_idx=1, config=CFG, stats=stats)
    sel = select_blocks(q, k, grid=grid, layer_idx=1, config=CFG)
    ids = block_ids(grid, "2d", CFG)
    assert stats["num_blocks"] == sel.shape[-1]
    assert float(stats["attended"]) == float(sel[..., ids].sum())
