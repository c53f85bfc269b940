"""Ulysses context parallelism on the CPU: two gloo ranks (spawned processes) against one process.

One spawn of two ranks (about 30 s on two busy cores: each imports torch and diffusers) computes,
per rank, everything the tests below check; the single-process references are computed in the
same processes before they split anything, so each comparison is one process against two:
- `vmoba_attention_ulysses` on an odd grid, three selections, every layer kind: this rank's rows
  of the output against `vmoba_attention` on the whole sequence, and the selection of this
  rank's heads (after the all-to-all) against the whole sequence's selection of those heads;
- a whole tiny Wan generation (VMoBA top-k with a dense first step, drift statistics on) with
  the transformer split over the ranks (`enable_ulysses`: diffusers' hooks and dense Ulysses,
  VMoBA's own exchange) against the same generation unsplit: video, latents and statistics;
- a head count the rank count does not divide is refused with a message that names the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(300)

WORLD = 2
GRID = (3, 5, 4)  # 60 tokens: 30 per rank; odd sides, ragged chunks
BATCH, HEADS, HEAD_DIM = 2, 4, 16
SELECTIONS = [
    dict(select="topk", topk=(1, 2, 3)),
    dict(select="threshold_global", threshold=0.3),
    dict(select="threshold_query", threshold=0.5),
]
# Two processes run the same fp32 operations on the same numbers (only the rows or heads each
# holds differ): their results may differ from one process by float rounding at most.
FP32_ATOL = 1e-5
FRAMES, HEIGHT, WIDTH = 9, 64, 64  # latent grid (3, 4, 4): 48 tokens, 24 per rank


def _rank(rank: int, world: int, port: int, queue) -> None:
    """One rank: the single-process references first, then the same work split over the group."""
    import torch.distributed as dist

    from vmoba import VMoBAConfig, select_blocks, vmoba_attention
    from vmoba.parallel import heads_from_sequence, vmoba_attention_ulysses

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    out: dict = {"rank": rank}

    # -- the op -----------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    s = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(BATCH, s, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    rows = slice(rank * s // world, (rank + 1) * s // world)
    heads = slice(rank * HEADS // world, (rank + 1) * HEADS // world)
    op = []
    for sel in SELECTIONS:
        config = VMoBAConfig(temporal_chunk=1, spatial_chunk=(2, 2), st_chunk=(1, 2, 2), **sel)
        for layer in range(3):
            kw = dict(grid=GRID, layer_idx=layer, config=config, kernel="reference")
            ref = vmoba_attention(q, k, v, **kw)
            split = vmoba_attention_ulysses(q[:, rows], k[:, rows], v[:, rows], **kw)
            qh, kh, _ = heads_from_sequence([q[:, rows], k[:, rows], v[:, rows]])
            ref_sel = select_blocks(q, k, grid=GRID, layer_idx=layer, config=config)
            sel_split = select_blocks(qh, kh, grid=GRID, layer_idx=layer, config=config)
            op.append(
                dict(
                    select=sel["select"],
                    layer=layer,
                    max_diff=float((split - ref[:, rows]).abs().max()),
                    shape=tuple(split.shape),
                    same_selection=bool(torch.equal(sel_split, ref_sel[:, heads])),
                    selected=int(ref_sel[:, heads].sum()),
                    blocks=int(ref_sel[:, heads].numel()),
                )
            )
    out["op"] = op

    # -- a head count the group does not divide -----------------------------------------------
    from diffusers import WanTransformer3DModel

    from worker.tiny_model import TRANSFORMER_CONFIG

    odd = WanTransformer3DModel(**dict(TRANSFORMER_CONFIG, num_attention_heads=3)).eval()
    from vmoba.diffusers.parallel import enable_ulysses

    try:
        enable_ulysses([odd])
        out["refusal"] = None
    except ValueError as exc:
        out["refusal"] = str(exc)

    # -- a whole tiny generation ----------------------------------------------------------------
    from vmoba.diffusers import AttentionSettings, install_vmoba
    from worker.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    handle = install_vmoba(pipe)
    settings = AttentionSettings(
        select="topk", topk=(1, 2, 3), dense_steps=0.34, collect_drift=True
    )

    def generate(output_type):
        with handle.use(settings) as stats:
            frames = pipe(
                prompt="a red fox running through snow",
                negative_prompt="blurry",
                num_frames=FRAMES,
                height=HEIGHT,
                width=WIDTH,
                num_inference_steps=3,
                guidance_scale=5.0,
                max_sequence_length=32,
                generator=torch.Generator().manual_seed(1),
                output_type=output_type,
            ).frames
        return np.asarray(frames), stats

    out["one_video"], out["one_stats"] = generate("np")
    out["one_latents"], _ = generate("latent")
    enable_ulysses([pipe.transformer])
    out["video"], out["stats"] = generate("np")
    out["latents"], _ = generate("latent")
    queue.put(out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    from service.serve import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.spawn(_rank, args=(WORLD, free_port(), queue), nprocs=WORLD, join=False)
    # read before joining: a rank exits only once its results have left through the queue
    found = sorted((queue.get(timeout=240) for _ in range(WORLD)), key=lambda r: r["rank"])
    while not procs.join():
        pass
    assert [r["rank"] for r in found] == list(range(WORLD))
    return found


def test_split_attention_matches_one_process_with_the_same_selection(ranks):
    for r in ranks:
        assert len(r["op"]) == len(SELECTIONS) * 3
        for case in r["op"]:
            assert case["shape"] == (BATCH, 60 // WORLD, HEADS, HEAD_DIM), case
            assert case["max_diff"] <= FP32_ATOL, case
            assert case["same_selection"], case
            # a real selection: neither nothing but the own block nor everything
            assert 0 < case["selected"] < case["blocks"], case


def test_a_whole_generation_on_two_ranks_matches_one_process(ranks):
    for r in ranks:
        assert r["video"].shape == r["one_video"].shape == (1, FRAMES, HEIGHT, WIDTH, 3)
        np.testing.assert_allclose(r["video"], r["one_video"], rtol=0, atol=FP32_ATOL)
        np.testing.assert_allclose(r["latents"], r["one_latents"], rtol=0, atol=FP32_ATOL)
        # both ranks hold the whole result (the output of the last block is gathered)
        np.testing.assert_allclose(r["latents"], ranks[0]["latents"], rtol=0, atol=0)


def test_statistics_of_the_split_run_are_the_whole_calls(ranks):
    for r in ranks:
        one, split = r["one_stats"], r["stats"]
        assert split["layer_calls"] == one["layer_calls"] == {"dense": 6, "sparse": 12}
        assert split["dense_steps"] == one["dense_steps"] == 1
        assert 0 < one["density"] < 1
        for key in ("density", "attention_flops", "attention_flops_dense"):
            assert split[key] == pytest.approx(one[key], rel=1e-9), key
        assert split["density_by_kind"] == pytest.approx(one["density_by_kind"], rel=1e-9)
        assert split["drift"]["rows"] == one["drift"]["rows"]
        assert split["drift"]["rel_l2"] == pytest.approx(one["drift"]["rel_l2"], rel=1e-6)
        assert split["drift"]["mass_kept"] == pytest.approx(one["drift"]["mass_kept"], rel=1e-6)


def test_a_head_count_the_ranks_do_not_divide_is_refused(ranks):
    message = ranks[0]["refusal"]
    assert message is not None
    assert "3 attention heads" in message and "divisible by 2" in message
    assert "use one of [3] GPUs per job" in message


def test_check_heads_names_the_counts_that_work():
    from vmoba.parallel import check_heads

    check_heads(12, 4)
    with pytest.raises(ValueError, match=r"40 attention heads; use one of \[2, 4, 5, 8, 10"):
        check_heads(40, 3)
