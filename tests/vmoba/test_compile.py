"""VMoBA's custom ops and the regionally compiled Wan transformer (CPU, reference kernels).

The compile tests use dynamo with the `aot_eager` backend: it traces the blocks into one graph
through the ops' fake implementations and functionalisation, as inductor does, without
inductor's C++ compile (minutes on two cores). Recompilations are counted by the backend.
"""

from __future__ import annotations

import pytest
import torch

from vmoba import VMoBAConfig, vmoba_attention
from vmoba.diffusers import AttentionSettings, install_vmoba
from vmoba.diffusers.compile import compile_blocks
from vmoba.ops import call_attention

FRAMES, HEIGHT, WIDTH = 9, 64, 80  # latent grid (3, 4, 5): 60 tokens
STEPS = 4


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("1d", VMoBAConfig(temporal_chunk=2, select="topk", topk=(2, 1, 1))),
        ("2d", VMoBAConfig(spatial_chunk=(3, 2), select="threshold_query", threshold=0.4)),
        ("3d", VMoBAConfig(st_chunk=(2, 3, 4), select="threshold_global", threshold=0.3)),
    ],
)
def test_attention_op_is_vmoba_attention(kind, config):
    """`vmoba::attention` gives `vmoba_attention`'s output and attended count, odd grid."""
    grid, b, h, d = (3, 5, 7), 2, 3, 16
    q, k, v = (torch.randn(b, 105, h, d) for _ in range(3))
    stats: dict = {}
    layer = config.layer_kinds.index(kind)
    ref = vmoba_attention(q, k, v, grid=grid, layer_idx=layer, config=config, stats=stats)
    out, attended = call_attention(
        q, k, v, grid=grid, kind=kind, config=config, softmax_scale=d**-0.5
    )
    assert torch.equal(out, ref)
    assert out.is_contiguous()
    assert attended.dtype == torch.float64 and attended.shape == ()
    assert attended.item() == stats["attended"].item()


def test_attention_op_opcheck():
    """torch.library's checks of the op: schema, fake implementation, dispatch (no autograd
    registered yet: a backward is glued on with `register_autograd`)."""
    q, k, v = (torch.randn(1, 60, 2, 8) for _ in range(3))
    # grid (3, 4, 5); chunks: temporal 2, spatial (2, 3), spatio-temporal (2, 2, 3)
    args = (q, k, v, [3, 4, 5], "3d", [2, 2, 3, 2, 2, 3], "topk", 0.25, [2, 3, 4], 0.3, "auto")
    torch.library.opcheck(
        torch.ops.vmoba.attention.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.fixture
def one_thread():
    """The tiny model's matrices are too small to split: extra threads only wait (5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    from worker.tiny_model import build_tiny_pipeline

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, handle, settings, seed=1):
    with torch.no_grad(), handle.use(settings) as stats:
        latents = pipe(
            prompt="a red fox running through snow",
            num_frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).frames
    return latents, stats


# 20 requests that differ in every per-request setting, dense steps and statistics included
REQUESTS = [
    AttentionSettings(select="topk", topk=(1, 2, 3), dense_steps=0.25),
    AttentionSettings(select="topk", topk=2, dense_steps=0.0),
    AttentionSettings(select="topk", topk=(3, 1, 2), dense_steps=0.5),
    AttentionSettings(select="topk", topk=1, dense_steps=0.75),
    AttentionSettings(select="topk", topk=(2, 4, 6), dense_steps=1.0),
    AttentionSettings(select="threshold_global", threshold=0.25),
    AttentionSettings(select="threshold_global", threshold=0.6, dense_steps=0.0),
    AttentionSettings(select="threshold_global", threshold=0.1, dense_steps=0.5),
    AttentionSettings(select="threshold_query", threshold=0.3),
    AttentionSettings(select="threshold_query", threshold=0.9, dense_steps=0.0),
    AttentionSettings(select="threshold_query", threshold=0.05, dense_steps=0.25),
    AttentionSettings(backend="dense"),
    AttentionSettings(backend="dense", collect_timing=True),
    AttentionSettings(threshold=0.4, collect_density=False),
    AttentionSettings(threshold=0.4, collect_timing=True, dense_steps=0.0),
    AttentionSettings(threshold=0.2, collect_drift=True, dense_steps=0.5),
    AttentionSettings(select="topk", topk=3, spatial_chunk=(2, 2), dense_steps=0.0),
    AttentionSettings(select="topk", topk=2, temporal_chunk=1, st_chunk=(1, 2, 3)),
    AttentionSettings(select="threshold_global", threshold=1.0, dense_steps=0.0),
    AttentionSettings(select="threshold_global", threshold=0.0, dense_steps=0.0),
]


def test_compiled_blocks_no_recompile_across_requests(pipe, one_thread):
    """One compiled graph for every block and every request: 20 requests with different modes,
    tau, k, chunks, dense steps and statistics compile nothing new, break no graph, and give
    the eager model's latents."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    assert len(REQUESTS) == 20 and len(set(REQUESTS)) == 20
    handle = install_vmoba(pipe)
    eager = [generate(pipe, handle, REQUESTS[i])[0] for i in (0, 5)]
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    try:
        compile_blocks(pipe.transformer, backend=backend)
        generate(pipe, handle, REQUESTS[0])  # warm-up: the one compilation
        assert backend.frame_count == 1
        for i, settings in enumerate(REQUESTS):
            latents, stats = generate(pipe, handle, settings)
            if i in (0, 5):
                assert torch.equal(latents, eager[(0, 5).index(i)])
            sparse = settings.backend == "vmoba" and settings.dense_cutoff(STEPS) < STEPS
            assert (stats["layer_calls"]["sparse"] > 0) == sparse
        assert backend.frame_count == 1, "a request recompiled the block"
        assert not counters["graph_break"]
    finally:
        handle.remove()
        for block in pipe.transformer.blocks:
            block._compiled_call_impl = None  # nn.Module.compile's wrapper: eager again
        torch._dynamo.reset()
