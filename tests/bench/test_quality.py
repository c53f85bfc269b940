"""bench.quality: video metrics, the dense-against-VMoBA harness on the tiny model, and the
synthetic comparison with tile-level top-k at a tiny grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import quality
from bench.quality_synthetic import tile_ids, tile_topk


def _video(seed: int, shape=(3, 24, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_identical_videos_have_infinite_psnr_and_ssim_one(seed):
    video = _video(seed)
    m = quality.video_metrics(video, video.copy())
    assert m["psnr"] == math.inf and m["ssim"] == 1.0
    assert m["psnr_by_frame"] == [math.inf] * 3 and m["ssim_by_frame"] == [1.0] * 3
    out = json.loads(json.dumps(quality.jsonable(m)))
    assert out["psnr"] == "inf" and out["ssim"] == 1.0 and out["psnr_by_frame"] == ["inf"] * 3
    assert quality.mean([math.inf, 20.0]) == math.inf


def test_psnr_is_the_formula_and_ssim_falls_with_noise(seed):
    ref = _video(seed)
    test = np.clip(
        ref.astype(int) + np.random.default_rng(seed + 1).integers(-8, 9, ref.shape), 0, 255
    )
    test = test.astype(np.uint8)
    mse = np.mean((ref.astype(float) - test) ** 2)
    assert quality.psnr(ref, test) == pytest.approx(10 * math.log10(255**2 / mse))
    assert 0 < quality.ssim(ref[0], test[0]) < 1
    with pytest.raises(ValueError, match="uint8"):
        quality.psnr(ref, ref[:2])


@pytest.mark.slow
def test_harness_end_to_end_on_the_tiny_model(tmp_path):
    """5 frames 32x32, 2 steps, one prompt; a sparse setting and one whose every step is dense
    (bit-identical to the dense video: PSNR "inf", SSIM 1). JSON, table and contact sheet."""
    from PIL import Image

    out = tmp_path / "quality.json"
    argv = [
        "--model",
        "tiny-wan2.1-t2v",
        "--device",
        "cpu",
        "--frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--num-prompts",
        "1",
        "--kernel",
        "reference",
        "--setting",
        '{"select": "threshold_global", "threshold": 0.25, "dense_steps": 0}',
        "--setting",
        '{"dense_steps": 1.0}',
        "--out",
        str(out),
        "--sheet-width",
        "64",
    ]
    assert quality.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["bench"] == "quality" and record["model"] == "tiny-wan2.1-t2v"
    assert record["grid"] == [2, 2, 2] and record["steps"] == 2 and len(record["prompts"]) == 1
    assert record["commit"] and record["device"] == "cpu"
    dense, sparse, all_dense = record["results"]
    assert dense["name"] == "dense" and dense["summary"]["psnr"] is None
    assert dense["videos"][0]["wall_s"] > 0

    s = sparse["summary"]
    assert (
        sparse["settings"]["select"] == "threshold_global" and sparse["settings"]["collect_drift"]
    )
    assert isinstance(s["psnr"], float) and 0 < s["ssim"] < 1 and 0 < s["density"] < 1
    assert s["rel_l2"] > 0 and 0 < s["mass_kept"] < 1 and s["wall_s"] > 0
    video = sparse["videos"][0]
    assert len(video["psnr_by_frame"]) == 5 and video["seed"] == record["seeds"][0]
    drift = video["drift"]
    assert set(drift["by_kind"]) == {"1d", "2d", "3d"}
    assert [st["step"] for st in drift["by_step"]] == [0, 1]

    # the model's defaults fill what the setting leaves out (tiny: stock weights, so topk)
    assert all_dense["settings"]["select"] == "topk" and all_dense["settings"]["dense_steps"] == 1.0
    assert all_dense["summary"]["psnr"] == "inf" and all_dense["summary"]["ssim"] == 1.0
    assert all_dense["videos"][0]["drift"]["calls"] == 0

    sheet = tmp_path / "quality.png"
    assert record["contact_sheet"] == str(sheet)
    with Image.open(sheet) as img:
        assert img.format == "PNG"
        assert img.width == 6 + 4 * (64 + 6)  # 4 frames of 64 px
        assert img.height > 3 * 64


def test_default_settings_are_the_models_and_threshold_global():
    from contract.models import get_model

    spec = get_model("wan2.1-t2v-1.3b-random")
    grid = (21, 30, 52)
    settings = quality.resolve_settings(spec, grid, [], kernel="auto", drift=True)
    assert [(s.select, s.topk if s.select == "topk" else s.threshold) for s in settings] == [
        ("topk", (2, 6, 18)),
        ("threshold_global", 0.25),
    ]
    assert all(s.dense_steps == 0.25 and s.collect_drift for s in settings)
    assert quality.label(settings[0], grid) == "topk 2/6/18, dense 25%"
    with pytest.raises(ValueError, match="dense run"):
        quality.resolve_settings(spec, grid, [{"backend": "dense"}], kernel="auto", drift=True)


# -- synthetic ------------------------------------------------------------------------------------


def test_tile_topk_matches_the_density_and_keeps_the_own_tile(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 100, 2, 8, generator=gen)
    ids = tile_ids(torch.arange(100), 16)  # 7 tiles, the last one of 4 tokens
    assert ids.tolist() == [i // 16 for i in range(100)]
    full = tile_topk(q, k, ids, 1.0)
    assert full["k_tile"] == full["tiles"] == 7 and full["density"] == pytest.approx(1.0)
    assert bool(full["selected"].all())
    t = tile_topk(q, k, ids, 0.3)
    assert t["k_tile"] == 2 and abs(t["density"] - 0.3) < 16 / 100
    diag = t["selected"].diagonal(dim1=-2, dim2=-1)
    assert bool(diag.all()) and int(t["selected"].sum(-1).unique().numel()) == 1
    # a permuted order: tiles follow the order, not the raster
    order = torch.randperm(100, generator=gen)
    ids_perm = tile_ids(order, 16)
    assert ids_perm[order].tolist() == [i // 16 for i in range(100)]


def test_synthetic_comparison_at_a_tiny_grid(tmp_path):
    out = tmp_path / "synthetic.json"
    argv = [
        "--synthetic",
        "--device",
        "cpu",
        "--grids",
        "3,4,6;4,6,8",
        "--heads",
        "2",
        "--head-dim",
        "16",
        "--tile",
        "8",
        "--rows",
        "32",
        "--out",
        str(out),
    ]
    assert quality.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["bench"] == "quality-synthetic" and record["commit"] and record["device"] == "cpu"
    assert record["full_size"] is False and record["inputs"]["heads"] == 2
    assert [g["grid"] for g in record["grids"]] == [[3, 4, 6], [4, 6, 8]]
    for g in record["grids"]:
        assert set(g["kinds"]) == {"1d", "2d", "3d"}
        for kind in g["kinds"].values():
            assert [r["mode"] for r in kind["results"]] == [
                "topk",
                "threshold_query",
                "threshold_global",
            ]
            for r in kind["results"]:
                tile_step = 8 / g["tokens"] + 1e-9  # one more key tile per query tile
                for method in ("vmoba", "tile_natural", "tile_blocked"):
                    m = r[method]
                    assert (
                        0 < m["density"] <= 1
                        and m["rel_l2"] >= 0
                        and 0 < m["mass_kept"] <= 1 + 1e-6
                    )
                    if method != "vmoba":
                        assert abs(m["density"] - r["vmoba"]["density"]) <= tile_step
    assert len(record["verdicts"]) == 2 * 3 * 3
    assert all(isinstance(v["vmoba_loses"], bool) for v in record["verdicts"])


def test_a_checkpoint_outside_the_registry_and_vmoba_trained_defaults():
    args = quality.parser().parse_args(
        ["--model", "wan2.1-t2v-1.3b", "--weights", "/ckpt/wan-vmoba", "--vmoba-trained"]
    )
    spec = quality.model_spec(args)
    assert spec.hub_id == "/ckpt/wan-vmoba" and spec.weights == "hub" and spec.vmoba_trained
    assert spec.grid(81, 480, 832) == (21, 30, 52)
    # trained weights default to threshold_global 0.25: the same as the second default, once
    settings = quality.resolve_settings(spec, (21, 30, 52), [], kernel="auto", drift=False)
    assert [(s.select, s.threshold, s.collect_drift) for s in settings] == [
        ("threshold_global", 0.25, False)
    ]
    with pytest.raises(SystemExit, match="unknown model"):
        quality.model_spec(quality.parser().parse_args(["--model", "nope"]))
