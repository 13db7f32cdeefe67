"""Shared fixtures: one small demo world per test session (built once, about a minute);
tests marked ``gpu`` are skipped on machines without CUDA (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `bdlens world build --small` world in a session-private cache directory, or in
    ``$BDLENS_TEST_WORLD_CACHE`` when set (reused across sessions while developing; CI leaves it unset)."""
    from bdlens.world.build import build

    cache = os.environ.get("BDLENS_TEST_WORLD_CACHE")
    return build(small=True, cache_dir=Path(cache) if cache else tmp_path_factory.mktemp("world-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
