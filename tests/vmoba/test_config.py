import pytest

from vmoba import VMoBAConfig


def test_defaults_are_the_paper_480p_settings():
    cfg = VMoBAConfig()
    assert cfg.temporal_chunk == 3 and cfg.spatial_chunk == (5, 13) and cfg.st_chunk == (7, 5, 13)
    assert cfg.select == "threshold_global" and cfg.threshold == 0.25 and cfg.topk == (2, 6, 18)
    assert [cfg.kind(i) for i in range(6)] == ["1d", "2d", "3d"] * 2
    assert VMoBAConfig(topk=4).topk == (4, 4, 4)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temporal_chunk", 0),
        ("temporal_chunk", -2),
        ("temporal_chunk", 1.5),
        ("temporal_chunk", True),
        ("spatial_chunk", (5,)),
        ("spatial_chunk", (5, 0)),
        ("spatial_chunk", "ab"),
        ("st_chunk", (1, 2)),
        ("st_chunk", (1, 2, -3)),
        ("layer_kinds", ("1d", "4d")),
        ("layer_kinds", ()),
        ("select", "top_k"),
        ("select", None),
        ("threshold", float("nan")),
        ("threshold", "0.3"),
        ("topk", 0),
        ("topk", (1, 2)),
        ("topk", (1, 2, 0)),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VMoBAConfig(**{field: value})


def test_bad_layer_index():
    with pytest.raises(ValueError, match="layer_idx"):
        VMoBAConfig().kind(-1)


def test_replace_validates():
    cfg = VMoBAConfig().replace(threshold=0.5)
    assert cfg.threshold == 0.5
    with pytest.raises(ValueError, match="select"):
        cfg.replace(select="nope")


# -- per-job attention settings: one definition beside VMoBAConfig ----------------------------------


def test_config_imports_without_torch():
    """The HTTP layer imports the settings' choices and defaults without torch."""
    import subprocess
    import sys

    code = (
        "import sys, vmoba.config; assert 'torch' not in sys.modules, 'vmoba.config'\n"
        "from vmoba import AttentionSettings, VMoBAConfig, merge_attention_settings\n"
        "AttentionSettings().vmoba_config((21, 30, 52))\n"
        "assert 'torch' not in sys.modules, 'vmoba'\n"
        "from vmoba import vmoba_attention\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_defaults_come_from_the_module_constants():
    import vmoba
    import vmoba.diffusers
    from vmoba import config

    s = config.AttentionSettings()
    assert (s.backend, s.select, s.threshold, s.topk, s.dense_steps, s.kernel) == (
        config.DEFAULT_BACKEND,
        config.DEFAULT_SELECT,
        config.DEFAULT_THRESHOLD,
        config.DEFAULT_TOPK,
        config.DEFAULT_DENSE_STEPS,
        config.DEFAULT_KERNEL,
    )
    cfg = VMoBAConfig()
    assert (cfg.select, cfg.threshold, cfg.topk) == (
        config.DEFAULT_SELECT,
        config.DEFAULT_THRESHOLD,
        config.DEFAULT_TOPK,
    )
    assert config.ATTENTION_BACKENDS == ("vmoba", "dense")
    assert config.KERNELS == ("auto", "triton", "reference")
    assert config.SELECT_MODES == ("topk", "threshold_query", "threshold_global")
    assert vmoba.AttentionSettings is vmoba.diffusers.AttentionSettings is config.AttentionSettings
    assert vmoba.diffusers.ATTENTION_BACKENDS is config.ATTENTION_BACKENDS
    assert vmoba.diffusers.KERNELS is config.KERNELS


def test_merge_later_layers_win_and_sources_say_which():
    from vmoba.config import AttentionSettings, merge_attention_settings

    settings, sources = merge_attention_settings(
        {"threshold": 0.3, "temporal_chunk": 2},  # model
        {"kernel": "triton", "threshold": 0.2, "collect_timing": True},  # operator
        {"select": "topk", "topk": [3, 4, 5], "threshold": None, "spatial_chunk": None},  # request
    )
    assert settings == AttentionSettings(
        threshold=0.2,
        temporal_chunk=2,
        kernel="triton",
        collect_timing=True,
        select="topk",
        topk=(3, 4, 5),
    )
    assert sources == {
        "backend": "default",
        "select": "request",
        "threshold": "operator",
        "topk": "request",
        "dense_steps": "default",
        "temporal_chunk": "model",
        "spatial_chunk": "default",
        "st_chunk": "default",
        "kernel": "operator",
        "collect_timing": "operator",
        "collect_density": "default",
        "collect_drift": "default",
    }
    assert set(sources) == set(AttentionSettings.field_names())


def test_merge_of_nothing_is_the_defaults():
    from vmoba.config import AttentionSettings, merge_attention_settings

    for layers in ((), (None, None, None), ({}, {}, {})):
        settings, sources = merge_attention_settings(*layers)
        assert settings == AttentionSettings()
        assert set(sources.values()) == {"default"}
    settings, sources = merge_attention_settings(request={"backend": "dense"})
    assert settings.backend == "dense" and sources["backend"] == "request"


@pytest.mark.parametrize(
    "layers, match",
    [
        (({"threshold": "high"}, None, None), r"threshold .*model"),
        ((None, {"kernel": "cuda"}, None), r"kernel .*operator"),
        ((None, None, {"topk": 0}), r"topk .*request"),
        ((None, None, {"dense_steps": 2.0}), r"dense_steps .*request"),
        ((None, {"spatial_chunk": [2]}, None), r"spatial_chunk .*operator"),
        ((None, None, {"tau": 0.3}), r"tau.*request"),
        (({"backend": "flash"}, None, {"select": "topk"}), r"backend .*model"),
        ((None, ["kernel"], None), r"operator attention settings must be an object"),
    ],
)
def test_merge_errors_name_the_field_and_its_layer(layers, match):
    from vmoba.config import merge_attention_settings

    with pytest.raises(ValueError, match=match):
        merge_attention_settings(*layers)


def test_merge_validates_the_merged_values_once():
    """A later layer replaces a value before validation: only the merged settings must be valid."""
    from vmoba.config import merge_attention_settings

    settings, sources = merge_attention_settings({"topk": 0}, None, {"topk": 4})
    assert settings.topk == (4, 4, 4) and sources["topk"] == "request"
