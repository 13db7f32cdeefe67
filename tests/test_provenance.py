"""Paths as manifests record them: portable between machines (no absolute paths of the training machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdlens.configs import CONFIG_DIR, REPOSITORY, portable_path, resolve_portable
from bdlens.training.deterministic import resolve_data_path


def test_paths_in_the_cache_the_repository_and_the_working_directory_become_relative(tmp_path, monkeypatch) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    (cache / "world-abc" / "truth.zarr").mkdir(parents=True)
    (work / "runs" / "det").mkdir(parents=True)
    monkeypatch.setenv("BDLENS_CACHE_DIR", str(cache))
    monkeypatch.chdir(work)
    assert portable_path(cache / "world-abc" / "truth.zarr") == "$BDLENS_CACHE_DIR/world-abc/truth.zarr"
    assert portable_path(CONFIG_DIR / "vi_demo.yaml") == "configs/vi_demo.yaml"
    assert portable_path(work / "runs" / "det") == portable_path("runs/det") == "runs/det"
    assert portable_path("/elsewhere/data.zarr") == "/elsewhere/data.zarr"  # the user's own data: as given
    # read back on a machine whose cache is elsewhere
    other = tmp_path / "other-cache"
    (other / "world-abc" / "truth.zarr").mkdir(parents=True)
    monkeypatch.setenv("BDLENS_CACHE_DIR", str(other))
    assert resolve_portable("$BDLENS_CACHE_DIR/world-abc/truth.zarr") == other / "world-abc" / "truth.zarr"
    assert resolve_data_path("$BDLENS_CACHE_DIR/world-abc/truth.zarr") == other / "world-abc" / "truth.zarr"
    assert resolve_portable("configs/vi_demo.yaml") == CONFIG_DIR / "vi_demo.yaml"  # from any working directory, any install
    assert resolve_portable("bdlens/assets/models") == REPOSITORY / "bdlens" / "assets" / "models"
    assert resolve_portable("runs/det") == Path("runs/det")


def test_a_recorded_world_missing_here_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from bdlens.errors import BdlensError

    monkeypatch.setenv("BDLENS_CACHE_DIR", str(tmp_path))
    with pytest.raises(BdlensError, match="world-gone/truth.zarr does not exist"):
        resolve_data_path("$BDLENS_CACHE_DIR/world-gone/truth.zarr")
