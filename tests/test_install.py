"""A non-editable install (what `pip install bdlens` from a wheel gives) holds the whole package and runs
the quick start's forecast: the bundled models, the demo analyses (zarr metadata in dotfiles) and the
shipped configs that the bundled calibration names (bdlens/configs.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import xarray as xr

ROOT = Path(__file__).resolve().parents[1]


def _package_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_a_wheel_install_ships_every_file_of_the_package_and_forecasts(tmp_path) -> None:
    # Built from a copy, so that the build leaves nothing in the repository.
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bdlens", source / "bdlens", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True)

    missing = _package_files(ROOT / "bdlens") - _package_files(target / "bdlens")
    assert not missing, f"not in the installed package: {sorted(missing)[:10]}"

    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    imported = subprocess.run([sys.executable, "-c", "import bdlens; print(bdlens.__file__)"], cwd=work, env=env,
                              check=True, capture_output=True, text=True).stdout.strip()
    assert Path(imported).is_relative_to(target), imported  # the installed copy, not the repository's
    done = subprocess.run([sys.executable, "-m", "bdlens", "ensemble", "--members", "2", "--weights", "2", "--lead", "1d",
                           "--out", "f.zarr", "--threads", "1", "-q"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    forecast = xr.open_zarr(work / "f.zarr")
    assert forecast.sizes["number"] == 2 and bool(forecast["geopotential"].notnull().all())
