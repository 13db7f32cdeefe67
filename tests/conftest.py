"""Shared fixtures: one small demo world per test session (built once, about a minute);
tests marked ``gpu`` are skipped on machines without CUDA (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

XLA_CACHE = pytest.StashKey[Path | None]()  # the session's own cache directory, removed at its end


def pytest_configure(config: pytest.Config) -> None:
    """A persistent XLA compilation cache for the session (and the CLI subprocesses it starts): each
    physics-ensemble run compiles the dinosaur core anew, about 10 s on 2 cores, and a repeat of a
    compiled shape then loads it from disk instead (the same executable, so the same numbers)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    cache = os.environ.get("BDLENS_TEST_WORLD_CACHE")
    path = Path(cache) / "xla" if cache else Path(tempfile.mkdtemp(prefix="bdlens-xla-"))
    config.stash[XLA_CACHE] = None if cache else path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(XLA_CACHE, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)



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
