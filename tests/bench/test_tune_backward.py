"""bench.tune_backward's choice of the best backward config from its records (CPU: the records
are made up; the configs are the ones the sweep would record, through `bench.common.bwd_config`)."""

from __future__ import annotations

import random

from bench.common import bwd_config
from bench.tune_backward import VARIANTS, best_config
from vmoba.config import LAYER_KINDS


def sweep(ms_of) -> list[dict]:
    """Records of every candidate in every kind, `kernel_ms` from `ms_of(config)`."""
    records = []
    for kind in LAYER_KINDS:
        for override in (c for name in ("default", "split", "fused") for c in VARIANTS[name]):
            with bwd_config(override) as cfg:
                records.append(dict(layer_kind=kind, config=cfg, kernel_ms=ms_of(cfg)))
    return records


def test_best_config_combines_the_split_kernels_and_picks_the_faster_variant(seed):
    split = VARIANTS["split"]
    fast_dkdv, fast_dq = split[2]["dkdv"], split[1]["dq"]  # from different pairs

    def ms(cfg, fused_fast: dict | None = None):
        if cfg["fused_dq"]:
            fast = cfg["dkdv"] == fused_fast
            return {"dkdv": 8.0 if fast else random.uniform(40, 50), "dq": 0.0, "delta": 0.1}
        dkdv = 5.0 if cfg["dkdv"] == fast_dkdv else random.uniform(20, 30)
        dq = 5.0 if cfg["dq"] == fast_dq else random.uniform(10, 20)
        return {"dkdv": dkdv, "dq": dq, "delta": 0.1}

    best = best_config(sweep(ms))
    assert best == {"fused_dq": False, "dkdv": fast_dkdv, "dq": fast_dq}

    fused_fast = VARIANTS["fused"][3]["dkdv"]
    best = best_config(sweep(lambda cfg: ms(cfg, fused_fast)))
    assert best == {"fused_dq": True, "dkdv": fused_fast}
    with bwd_config(best) as cfg:  # usable as VMOBA_BWD_CONFIG as it is
        assert cfg["fused_dq"] and cfg["dkdv"] == fused_fast
