"""Attention-level drift (`vmoba.drift`): sparse output against dense attention on sampled rows,
and the same numbers collected per layer kind and step through the diffusers processor."""

from __future__ import annotations

import math

import pytest
import torch

from vmoba import VMoBAConfig, select_blocks, vmoba_attention
from vmoba.diffusers import AttentionSettings, install_vmoba
from vmoba.diffusers.statistics import Stats
from vmoba.drift import DEFAULT_ROWS, Drift, attention_drift, drift_sums, sample_rows
from vmoba.inputs import locality_qkv
from vmoba.partition import block_ids, num_blocks

GRID = (6, 8, 10)  # 480 tokens; auto chunks give 6 / 30 / 36 blocks
HEADS, HEAD_DIM = 2, 32
ALL_ROWS = 10**6  # more than the tokens: every row is measured (no sampling noise)


def _inputs(seed: int, grid=GRID):
    return locality_qkv(grid, 1, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def _drift(q, k, v, cfg, layer, *, with_out=True, rows=ALL_ROWS):
    out = vmoba_attention(q, k, v, grid=GRID, layer_idx=layer, config=cfg, kernel="reference")
    return attention_drift(
        q,
        k,
        v,
        grid=GRID,
        layer_idx=layer,
        config=cfg,
        out=out if with_out else None,
        kernel="reference",
        rows=rows,
    )


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("select", ["threshold_global", "threshold_query", "topk"])
def test_every_block_selected_has_no_drift(seed, layer, select):
    q, k, v = _inputs(seed)
    c_max = max(num_blocks(GRID, kind, VMoBAConfig.for_grid(GRID)) for kind in ("1d", "2d", "3d"))
    cfg = VMoBAConfig.for_grid(GRID, select=select, threshold=1.0, topk=c_max)
    for with_out in (True, False):
        d = _drift(q, k, v, cfg, layer, with_out=with_out)
        assert d.rel_l2 < 1e-5, (with_out, d)
        assert d.mass_kept == pytest.approx(1.0, abs=1e-6)
        assert d.rows == HEADS * math.prod(GRID)


@pytest.mark.parametrize("select", ["threshold_global", "threshold_query"])
def test_drift_grows_as_tau_falls(seed, select):
    """Lower tau selects a subset of the blocks (the same ranking, cut earlier): less mass kept,
    and on locality-structured inputs a larger error, monotone over a few tau values."""
    q, k, v = _inputs(seed)
    taus = (0.9, 0.6, 0.4, 0.25, 0.1)
    for layer in range(3):
        drifts = [
            _drift(q, k, v, VMoBAConfig.for_grid(GRID, select=select, threshold=t), layer)
            for t in taus
        ]
        errors = [d.rel_l2 for d in drifts]
        masses = [d.mass_kept for d in drifts]
        assert all(a < b for a, b in zip(errors, errors[1:])), (layer, errors)
        assert all(a > b for a, b in zip(masses, masses[1:])), (layer, masses)
        assert 0 < masses[-1] < masses[0] < 1


def test_drift_is_the_formula_on_the_sampled_rows(seed):
    """Against a direct fp64 computation: full dense attention, the full sparse output, the rows."""
    q, k, v = _inputs(seed)
    cfg = VMoBAConfig.for_grid(GRID, select="topk", topk=(2, 6, 9))
    layer, rows = 1, 64
    out = vmoba_attention(q, k, v, grid=GRID, layer_idx=layer, config=cfg, kernel="reference")
    d = attention_drift(
        q, k, v, grid=GRID, layer_idx=layer, config=cfg, out=out, kernel="reference", rows=rows
    )

    idx = sample_rows(math.prod(GRID), rows)
    qd, kd, vd, od = (x.double().transpose(1, 2) for x in (q, k, v, out))  # [B, H, S, D]
    probs = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1)[:, :, idx]
    dense = probs @ vd
    err = (od[:, :, idx] - dense).square().sum().sqrt() / dense.square().sum().sqrt()
    selected = select_blocks(q, k, grid=GRID, layer_idx=layer, config=cfg, kernel="reference")
    allowed = selected[:, :, idx][..., block_ids(GRID, "2d", cfg)]
    mass = (probs * allowed).sum(-1).mean()
    assert d.rows == HEADS * rows
    assert d.rel_l2 == pytest.approx(float(err), rel=1e-5)
    assert d.mass_kept == pytest.approx(float(mass), rel=1e-6)


def test_several_selections_share_the_dense_rows(seed):
    """`drift_sums` with M selections gives each one's sums, the same as one at a time."""
    q, k, v = _inputs(seed)
    idx = sample_rows(math.prod(GRID), 32)
    sels = []
    for layer, tau in ((0, 0.3), (2, 0.6)):
        cfg = VMoBAConfig.for_grid(GRID, threshold=tau)
        selected = select_blocks(q, k, grid=GRID, layer_idx=layer, config=cfg, kernel="reference")
        sels.append((selected[:, :, idx], block_ids(GRID, cfg.kind(layer), cfg)))
    both = drift_sums(q, k, v, idx, sels)
    assert both.shape == (2, 3)
    for m, sel in enumerate(sels):
        torch.testing.assert_close(both[m], drift_sums(q, k, v, idx, [sel])[0])


def test_row_sample_is_fixed_distinct_and_sorted():
    a = sample_rows(1000, 100)
    assert torch.equal(a, sample_rows(1000, 100))
    assert a.numel() == 100 and a.unique().numel() == 100
    assert torch.equal(a, a.sort().values) and 0 <= int(a.min()) and int(a.max()) < 1000
    assert torch.equal(sample_rows(10, 100), torch.arange(10))  # fewer tokens than rows: all
    with pytest.raises(ValueError, match="rows"):
        sample_rows(10, 0)


def test_summary_groups_by_kind_and_step():
    """`Stats` keeps device tensors per (step, kind) and reads them once in `summary`."""
    stats = Stats()
    # (err2, ref2, mass) sums over 4 row vectors each
    stats.add_drift("1d", 2, torch.tensor([1.0, 4.0, 3.0], dtype=torch.float64), 4, 2)
    stats.add_drift("1d", 3, torch.tensor([0.0, 4.0, 4.0], dtype=torch.float64), 4, 2)
    stats.add_drift("2d", 3, torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64), 4, 2)
    assert all(isinstance(e[0], torch.Tensor) for e in stats.drift.values())
    drift = stats.summary(AttentionSettings(collect_drift=True))["drift"]
    assert drift["calls"] == 3 and drift["rows"] == 12 and drift["rows_per_call"] == 2
    assert drift["rel_l2"] == pytest.approx(math.sqrt(5 / 12))
    assert drift["mass_kept"] == pytest.approx(9 / 12)
    assert drift["by_kind"]["1d"] == {
        "rel_l2": pytest.approx(math.sqrt(1 / 8)),
        "mass_kept": 7 / 8,
        "calls": 2,
        "rows": 8,
    }
    assert [s["step"] for s in drift["by_step"]] == [2, 3]
    step3 = drift["by_step"][1]
    assert set(step3["by_kind"]) == {"1d", "2d"}
    assert step3["rel_l2"] == pytest.approx(math.sqrt(4 / 8))
    assert "drift" not in stats.summary(AttentionSettings())


def test_drift_from_sums():
    d = Drift.from_sums([9.0, 100.0, 3.5], 4)
    assert d == Drift(rel_l2=0.3, mass_kept=0.875, rows=4)
    assert d.to_dict() == {"rel_l2": 0.3, "mass_kept": 0.875, "rows": 4}


# -- through the diffusers processor (tiny Wan, reference kernel) ----------------------------------

FRAMES, SIZE, STEPS = 9, 64, 4  # latent grid (3, 4, 4): 48 tokens, fewer than DEFAULT_ROWS


@pytest.fixture(scope="module")
def pipe():
    from worker.tiny_model import build_tiny_pipeline

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, handle, settings):
    with handle.use(settings) as stats:
        pipe(
            prompt="a red fox running through snow",
            negative_prompt="blurry",
            num_frames=FRAMES,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        )
    return stats


def test_processor_reports_drift_per_kind_and_step(pipe):
    handle = install_vmoba(pipe, AttentionSettings(backend="dense"))
    try:
        sparse = AttentionSettings(
            kernel="reference", threshold=0.2, dense_steps=0.5, collect_drift=True
        )
        stats = _generate(pipe, handle, sparse)
        drift = stats["drift"]
        # steps 0 and 1 dense (not measured); 2 and 3 sparse, CFG: 2 calls per layer per step
        assert [s["step"] for s in drift["by_step"]] == [2, 3]
        assert set(drift["by_kind"]) == {"1d", "2d", "3d"}
        heads = pipe.transformer.config.num_attention_heads
        tokens = 3 * 4 * 4
        assert drift["rows_per_call"] == min(DEFAULT_ROWS, tokens)
        for kind, entry in drift["by_kind"].items():
            assert entry["calls"] == 2 * 2, kind
            assert entry["rows"] == entry["calls"] * heads * tokens
            assert 0 < entry["rel_l2"] and 0 < entry["mass_kept"] < 1, (kind, entry)
        for step in drift["by_step"]:
            assert set(step["by_kind"]) == {"1d", "2d", "3d"} and step["calls"] == 3 * 2
        assert 0 < drift["mass_kept"] < 1 and drift["calls"] == 12

        full = _generate(pipe, handle, sparse.replace(threshold=1.0))["drift"]
        assert full["rel_l2"] < 1e-5 and full["mass_kept"] == pytest.approx(1.0, abs=1e-6)

        assert "drift" not in _generate(pipe, handle, sparse.replace(collect_drift=False))
        dense = _generate(pipe, handle, sparse.replace(backend="dense"))["drift"]
        assert dense["calls"] == 0 and dense["rel_l2"] is None and dense["by_step"] == []
    finally:
        handle.remove()


def test_drift_collection_does_not_change_the_output(pipe):
    handle = install_vmoba(pipe, AttentionSettings(backend="dense"))
    try:
        settings = AttentionSettings(kernel="reference", threshold=0.2, dense_steps=0.0)
        outs = []
        for collect in (False, True):
            with handle.use(settings.replace(collect_drift=collect)):
                outs.append(
                    pipe(
                        prompt="waves",
                        num_frames=FRAMES,
                        height=SIZE,
                        width=SIZE,
                        num_inference_steps=2,
                        guidance_scale=1.0,
                        max_sequence_length=32,
                        generator=torch.Generator().manual_seed(3),
                        output_type="latent",
                    ).frames
                )
        assert torch.equal(outs[0], outs[1])
    finally:
        handle.remove()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="head dim 16 runs the Triton kernels in the interpreter only"
)
def test_triton_path_reports_the_same_drift(seed, pipe):
    """`kernel="triton"` (the Triton interpreter here): the drift measures the Triton selection
    and output, and agrees with the reference path's; a bare transformer has no step (`null`)."""
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, transformer.config.in_channels, 3, 8, 8, generator=gen)
    text = torch.randn(1, 8, transformer.config.text_dim, generator=gen)
    handle = install_vmoba(transformer, AttentionSettings(backend="dense"))
    drifts = {}
    try:
        for kernel in ("reference", "triton"):
            settings = AttentionSettings(
                kernel=kernel, threshold=0.3, dense_steps=0.0, collect_drift=True
            )
            with handle.use(settings) as stats, torch.no_grad():
                transformer(
                    hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text
                )
            drifts[kernel] = stats["drift"]
    finally:
        handle.remove()
    ref, tri = drifts["reference"], drifts["triton"]
    assert [s["step"] for s in tri["by_step"]] == [None] and tri["calls"] == 3
    for kind in ("1d", "2d", "3d"):
        assert tri["by_kind"][kind]["mass_kept"] == pytest.approx(
            ref["by_kind"][kind]["mass_kept"], rel=1e-5
        )
        assert tri["by_kind"][kind]["rel_l2"] == pytest.approx(
            ref["by_kind"][kind]["rel_l2"], rel=1e-3, abs=1e-5
        )
