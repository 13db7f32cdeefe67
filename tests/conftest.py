"""Shared fixtures: one small demo world per test session (built once, about a minute)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `bdlens world build --small` world in a session-private cache directory."""
    from bdlens.world.build import build

    return build(small=True, cache_dir=tmp_path_factory.mktemp("world-cache"))
