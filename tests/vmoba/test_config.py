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
