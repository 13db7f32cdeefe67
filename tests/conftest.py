"""Shared fixtures: one small demo world per test session (built once, about a minute);
tests marked ``gpu`` are skipped on machines without CUDA (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `bdlens world build --small` world in a session-private cache directory."""
    from bdlens.world.build import build

    return build(small=True, cache_dir=tmp_path_factory.mktemp("world-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
