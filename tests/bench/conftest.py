"""Seeded randomness for the benchmark tests, as in tests/vmoba: every test runs with torch's and
Python's global generators seeded by the `seed` fixture (autouse), fixed per test (a hash of its
id) unless `VMOBA_TEST_SEED` is set; a failing test's report shows its seed."""

from __future__ import annotations

import os
import random
import zlib

import pytest

SEED_ENV = "VMOBA_TEST_SEED"
_SEED = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed; the global generators are seeded with it before the test runs."""
    import torch

    value = int(os.environ.get(SEED_ENV) or zlib.crc32(request.node.nodeid.encode()))
    torch.manual_seed(value)
    random.seed(value)
    request.node.stash[_SEED] = value
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    value = item.stash.get(_SEED, None)
    if report.failed and value is not None:
        report.sections.append(
            (
                "random seed",
                f"this test ran with seed {value}; rerun it with {SEED_ENV}={value} pytest '{item.nodeid}'",
            )
        )
