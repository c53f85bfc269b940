"""VMoBA inside the tiny Wan pipeline (CPU, reference kernels): exactness, sparsity, settings."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vmoba.diffusers import AttentionSettings, VMoBAAttnProcessor, install_vmoba
from vmoba.partition import block_layout

# VMoBA with every block selected is dense attention computed by the fp32 reference (masked
# softmax) instead of SDPA: the video (values in [0, 1]) may differ by rounding only.
FULL_SELECTION_ATOL = 1e-4
# A sparse selection must move the video by clearly more than rounding.
SPARSE_MIN_DIFF = 1e-3

FRAMES, HEIGHT, WIDTH = 9, 64, 64  # latent grid (3, 4, 4): 48 tokens
STEPS = 4
SPARSE = AttentionSettings(threshold=0.05, dense_steps=0.0)
FULL = AttentionSettings(threshold=1.0, dense_steps=0.0)


@pytest.fixture(scope="module")
def pipe():
    from worker.tiny_model import build_tiny_pipeline

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, seed=1, output_type="np", **kw):
    """One generation; CFG is on (guidance 5), so the transformer runs twice per step."""
    args = dict(
        prompt="a red fox running through snow",
        negative_prompt="blurry",
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    args.update(kw)
    return pipe(**args).frames


@pytest.fixture(scope="module")
def stock_video(pipe):
    return generate(pipe)


@pytest.fixture
def handle(pipe):
    h = install_vmoba(pipe, AttentionSettings(backend="dense"))
    yield h
    h.remove()


def test_every_block_selected_matches_stock(pipe, stock_video, handle):
    with handle.use(FULL) as stats:
        video = generate(pipe)
    assert stats["density"] == 1.0
    assert stats["layer_calls"] == {"dense": 0, "sparse": STEPS * 2 * 3}
    np.testing.assert_allclose(video, stock_video, rtol=0, atol=FULL_SELECTION_ATOL)


def test_sparse_selection_changes_the_video(pipe, stock_video, handle):
    with handle.use(SPARSE) as stats:
        video = generate(pipe)
    assert np.abs(video - stock_video).max() > SPARSE_MIN_DIFF
    assert 0 < stats["density"] < 0.5
    assert set(stats["density_by_kind"]) == {"1d", "2d", "3d"}
    assert stats["attention_flops"] < stats["attention_flops_dense"]
    assert stats["attention_flops_saved"] == pytest.approx(
        stats["attention_flops_dense"] - stats["attention_flops"]
    )


def test_only_self_attention_processors_change(pipe):
    before = dict(pipe.transformer.attn_processors)
    h = install_vmoba(pipe)
    try:
        during = pipe.transformer.attn_processors
        assert during.keys() == before.keys()
        for name, proc in during.items():
            if ".attn1." in name:
                assert isinstance(proc, VMoBAAttnProcessor)
                assert proc.layer_idx == int(name.split(".")[1])  # blocks.<l>.attn1.processor
                assert proc.stock is before[name]
            else:
                assert proc is before[name], name
        assert sum(".attn1." in n for n in during) == len(pipe.transformer.blocks) == 3
    finally:
        h.remove()
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())


def test_remove_restores_bit_identical_output(pipe, stock_video):
    h = install_vmoba(pipe, SPARSE)
    sparse = generate(pipe)
    h.remove()
    assert not np.array_equal(sparse, stock_video)
    np.testing.assert_array_equal(generate(pipe), stock_video)
    # and installing again works after a remove
    install_vmoba(pipe).remove()


def _latents_per_step(pipe, **kw):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    generate(pipe, output_type="latent", callback_on_step_end=callback, **kw)
    return seen


def test_dense_steps_match_a_dense_run_exactly(pipe, handle):
    dense = _latents_per_step(pipe)  # backend="dense" from the handle's defaults
    # 0.5 of 4 steps: steps 0 and 1 dense. With CFG the transformer runs 8 times; a step index
    # counted from calls would switch after the first step.
    with handle.use(SPARSE.replace(dense_steps=0.5)) as stats:
        mixed = _latents_per_step(pipe)
    assert len(dense) == len(mixed) == STEPS
    for step in (0, 1):
        assert torch.equal(mixed[step], dense[step]), f"step {step} should be dense"
    assert not torch.equal(mixed[2], dense[2])
    assert stats["dense_steps"] == 2 and stats["steps"] == STEPS
    assert stats["layer_calls"] == {"dense": 2 * 2 * 3, "sparse": 2 * 2 * 3}


def test_dense_steps_without_guidance(pipe, handle):
    """One transformer call per step: the cutoff still falls on the step, not on calls."""
    with handle.use(SPARSE.replace(dense_steps=0.75)) as stats:
        _latents_per_step(pipe, guidance_scale=1.0)
    assert stats["dense_steps"] == 3
    assert stats["layer_calls"] == {"dense": 3 * 3, "sparse": 1 * 3}


def test_dense_stock_processor_equivalence(pipe, stock_video, handle):
    """backend="dense" runs through the VMoBA processors yet matches the stock ones bit for bit."""
    with handle.use(backend="dense") as stats:
        video = generate(pipe)
    np.testing.assert_array_equal(video, stock_video)
    assert stats["density"] is None and stats["attention_flops_ratio"] == 1.0


def test_settings_do_not_leak_into_the_next_call(pipe, stock_video, handle):
    with handle.use(SPARSE):
        first = generate(pipe)
    assert not np.array_equal(first, stock_video)
    np.testing.assert_array_equal(generate(pipe), stock_video)  # handle default: dense
    with handle.use(SPARSE.replace(threshold=0.5)):
        other = generate(pipe)
    with handle.use(SPARSE):
        again = generate(pipe)
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(other, first)


def test_settings_do_not_leak_across_threads(seed, pipe):
    """Two threads run the transformer at the same time, each with its own settings."""
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, transformer.config.in_channels, 3, 8, 8, generator=gen)
    text = torch.randn(1, 16, transformer.config.text_dim, generator=gen)
    t = torch.tensor([700.0])

    def forward():
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text).sample

    stock = forward()
    h = install_vmoba(transformer, AttentionSettings(backend="dense"))  # no scheduler
    try:
        with h.use(SPARSE):
            sparse = forward()
        assert not torch.equal(sparse, stock)
        barrier = threading.Barrier(2)
        results, errors = {}, []

        def run(name, settings, rounds=5):
            try:
                with h.use(settings) as stats:
                    barrier.wait()
                    outs = [forward() for _ in range(rounds)]
                results[name] = (outs, stats)
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=("sparse", SPARSE)),
            threading.Thread(target=run, args=("dense", AttentionSettings(backend="dense"))),
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        assert all(torch.equal(o, sparse) for o in results["sparse"][0])
        assert all(torch.equal(o, stock) for o in results["dense"][0])
        assert results["sparse"][1]["layer_calls"] == {"dense": 0, "sparse": 5 * 3}
        assert results["dense"][1]["layer_calls"] == {"dense": 5 * 3, "sparse": 0}
    finally:
        h.remove()


def test_dense_steps_need_a_step_source(seed, pipe):
    transformer = pipe.transformer
    h = install_vmoba(transformer, AttentionSettings(dense_steps=0.25))
    try:
        x = torch.randn(1, transformer.config.in_channels, 3, 8, 8)
        text = torch.randn(1, 4, transformer.config.text_dim)
        with pytest.raises(ValueError, match="dense_steps"), torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([1.0]), encoder_hidden_states=text)
    finally:
        h.remove()


def test_self_only_density_is_the_block_sizes(pipe, handle):
    """top-1 (self block only): density of a kind is `sum_c len_c^2 / S^2`."""
    settings = AttentionSettings(select="topk", topk=1, dense_steps=0.0)
    with handle.use(settings) as stats:
        generate(pipe, output_type="latent")
    grid = (1 + (FRAMES - 1) // 4, HEIGHT // 16, WIDTH // 16)
    s = grid[0] * grid[1] * grid[2]
    cfg = settings.vmoba_config(grid)
    for kind in ("1d", "2d", "3d"):
        lengths = block_layout(grid, kind, cfg).lengths.double()
        expected = float((lengths**2).sum()) / s**2
        assert stats["density_by_kind"][kind] == pytest.approx(expected, rel=1e-12)


def test_timing_only_when_asked(pipe, handle):
    with handle.use(SPARSE.replace(dense_steps=0.5, collect_timing=True)) as timed:
        generate(pipe, output_type="latent")
    assert timed["attention_ms"] > 0
    assert set(timed["attention_ms_by_kind"]) == {"dense", "1d", "2d", "3d"}
    with handle.use(SPARSE) as untimed:
        generate(pipe, output_type="latent")
    assert "attention_ms" not in untimed
    assert handle.stats() == untimed


def test_flops_of_full_selection_add_the_gate(pipe, handle):
    """tau >= 1 computes everything plus the gate: more FLOPs than dense, by the gate only."""
    with handle.use(FULL) as stats:
        generate(pipe, output_type="latent")
    transformer = pipe.transformer
    d_model = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    grid = (1 + (FRAMES - 1) // 4, HEIGHT // 16, WIDTH // 16)
    s = grid[0] * grid[1] * grid[2]
    cfg = FULL.vmoba_config(grid)
    calls_per_layer = STEPS * 2
    gate = sum(
        calls_per_layer * 2 * s * d_model * block_layout(grid, cfg.kind(layer), cfg).num_blocks
        for layer in range(3)
    )
    assert stats["attention_flops_dense"] == calls_per_layer * 3 * 4 * s * s * d_model
    assert stats["attention_flops"] == pytest.approx(stats["attention_flops_dense"] + gate)


# -- settings ------------------------------------------------------------------------------------


def test_settings_round_trip_through_json():
    import json

    s = AttentionSettings(select="topk", topk=[3, 5, 7], spatial_chunk=[2, 3], dense_steps=0.1)
    assert s.topk == (3, 5, 7) and s.spatial_chunk == (2, 3)
    back = AttentionSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert AttentionSettings(topk=4).topk == (4, 4, 4)
    assert AttentionSettings.from_dict({"threshold": None}) == AttentionSettings()
    assert AttentionSettings.from_dict(None) == AttentionSettings()


def test_explicit_chunks_override_the_automatic_ones():
    s = AttentionSettings(temporal_chunk=2)
    auto = AttentionSettings().vmoba_config((21, 30, 52))
    cfg = s.vmoba_config((21, 30, 52))
    assert cfg.temporal_chunk == 2
    assert (
        (cfg.spatial_chunk, cfg.st_chunk)
        == (auto.spatial_chunk, auto.st_chunk)
        == ((5, 13), (7, 5, 13))
    )


def test_dense_cutoff():
    assert AttentionSettings(dense_steps=0.25).dense_cutoff(50) == 12
    assert AttentionSettings(dense_steps=0.29).dense_cutoff(100) == 29
    assert AttentionSettings(dense_steps=1.0).dense_cutoff(7) == 7
    assert AttentionSettings(dense_steps=0.0).dense_cutoff(7) == 0


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"backend": "flash"}, "backend"),
        ({"select": "random"}, "select"),
        ({"threshold": "high"}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"topk": 0}, "topk"),
        ({"topk": (1, 2)}, "topk"),
        ({"dense_steps": 1.5}, "dense_steps"),
        ({"dense_steps": -0.1}, "dense_steps"),
        ({"dense_steps": True}, "dense_steps"),
        ({"temporal_chunk": 0}, "temporal_chunk"),
        ({"spatial_chunk": (2,)}, "spatial_chunk"),
        ({"st_chunk": (1, 2, -3)}, "st_chunk"),
        ({"kernel": "cuda"}, "kernel"),
        ({"collect_timing": "yes"}, "collect_timing"),
        ({"tau": 0.3}, "tau"),
    ],
)
def test_bad_settings_raise_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        AttentionSettings.from_dict(fields)


def test_bad_install_targets(pipe):
    with pytest.raises(ValueError, match="Wan pipeline or transformer"):
        install_vmoba(torch.nn.Linear(2, 2))
    h = install_vmoba(pipe)
    try:
        with pytest.raises(ValueError, match="already installed"):
            install_vmoba(pipe.transformer)
    finally:
        h.remove()
    with pytest.raises(ValueError, match="attention settings must be an object"):
        install_vmoba(pipe, "fast")
