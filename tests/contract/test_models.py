"""The model registry and the paper-faithful VMoBA defaults it leads to."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.models import REGISTRY, custom_model, get_model, resolve_model_id
from contract.request import GenerateRequest, Limits
from contract.settings import SharedSettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_every_family_has_a_tiny_twin_and_every_hub_model_a_random_one():
    families = {s.family for s in REGISTRY.values() if s.weights == "hub"}
    assert families == {s.family for s in REGISTRY.values() if s.weights == "tiny"}
    for spec in REGISTRY.values():
        if spec.weights == "hub":
            twin = REGISTRY[f"{spec.id}-random"]
            assert (twin.pipeline, twin.tasks, twin.vae_scale, twin.boundary_ratio) == (
                spec.pipeline,
                spec.tasks,
                spec.vae_scale,
                spec.boundary_ratio,
            )


def test_names_resolve():
    assert resolve_model_id("tiny") == "tiny-wan2.1-t2v"
    assert resolve_model_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "wan2.1-t2v-1.3b"
    assert resolve_model_id("WAN2.2-TI2V-5B") == "wan2.2-ti2v-5b"
    assert resolve_model_id("wan2.1-1.3b-random") == "wan2.1-t2v-1.3b-random"
    assert resolve_model_id("sora-2") is None
    with pytest.raises(KeyError, match="known: "):
        get_model("sora-2")
    mine = custom_model("/models/mine", "wan2.1-t2v-14b", vmoba_trained=True)
    assert mine.vmoba_trained and mine.grid(81, 720, 1280) == (21, 45, 80)
    assert [s.id for s in SharedSettings(MODEL="tiny, /models/x").models()] == [
        "tiny-wan2.1-t2v",
        "/models/x",
    ]


def test_grids_follow_each_family_compression():
    assert get_model("wan2.1-t2v-1.3b").grid(81, 480, 832) == (21, 30, 52)
    assert get_model("wan2.1-t2v-14b").grid(81, 720, 1280) == (21, 45, 80)
    assert get_model("wan2.2-ti2v-5b").grid(121, 704, 1280) == (31, 22, 40)
    assert get_model("tiny-wan2.2-ti2v").size_multiple == 32


def test_size_multiple_is_checked_per_model():
    lim = Limits.for_model(get_model("wan2.2-ti2v-5b"))
    with pytest.raises(ValueError, match="multiple of 32"):
        GenerateRequest.model_validate(
            {"prompt": "p", "width": 848, "height": 480}, context={"limits": lim}
        )
    req = GenerateRequest.model_validate({"prompt": "p"}, context={"limits": lim})
    assert (req.num_frames, req.width, req.height, req.fps, req.flow_shift) == (
        121,
        1280,
        704,
        24,
        5.0,
    )


def test_paper_defaults_per_grid():
    from vmoba.defaults import recommended_settings, topk_for_grid

    stock = get_model("wan2.1-t2v-1.3b")
    at_720p = recommended_settings(stock.grid(81, 720, 1280), vmoba_trained=False)
    assert at_720p == {
        "backend": "vmoba",
        "select": "topk",
        "topk": [2, 10, 9],
        "dense_steps": 0.25,
    }
    assert topk_for_grid(stock.grid(81, 480, 832)) == (2, 6, 18)
    # Elsewhere: the density nearest the paper's per kind (Wan 2.2 5B's default grid).
    assert topk_for_grid((31, 22, 40)) == (2, 8, 11)
    trained = custom_model("/m", "wan2.1-t2v-1.3b", vmoba_trained=True)
    assert (
        recommended_settings(trained.grid(81, 480, 832), vmoba_trained=True)["select"]
        == "threshold_global"
    )


def test_docs_list_every_model():
    text = DOCS.read_text()
    missing = [model_id for model_id in REGISTRY if f"`{model_id}`" not in text]
    assert not missing, f"docs/models.md lacks {missing}"
