"""Shared pieces of the demo-world evaluation scripts: test inits, verification, RMSE tables."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.configs import config_path
from bdlens.data import open_dataset
from bdlens.data.export import BUNDLED_ANALYSIS
from bdlens.data.splits import load_data_config, period_inits
from bdlens.metrics import ensemble_mean_rmse, spread
from bdlens.world.build import build

# Headline fields: name → (variable, level or None).
FIELDS = {
    "z500": ("geopotential", 500),
    "t850": ("temperature", 850),
    "u850": ("u_component_of_wind", 850),
    "mslp": ("mean_sea_level_pressure", None),
}


def realization(world: Path) -> str | None:
    """Which realization of its configuration a world is: None for the one the bundled demo analyses
    come from (or a world without their times), else a fingerprint of its analyses at those times.

    The dynamical core is chaotic: the same config and seed built with another CPU or jax version
    gives another trajectory with the same climate (README, "The demo world"), so results computed
    on two realizations must not be mixed. The bundled analyses are the reference because they ship
    with the package.
    """
    bundled = open_dataset(BUNDLED_ANALYSIS, sparse_times=True)
    analysis = open_dataset(Path(world) / "analysis.zarr")
    if not np.isin(bundled.time.values, analysis.time.values).all():
        return None
    here = {name: analysis[name].sel(time=bundled.time.values).values for name in sorted(bundled.data_vars)}
    if all(np.array_equal(values, bundled[name].values) for name, values in here.items()):
        return None
    digest = hashlib.sha256()
    for values in here.values():
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:12]


def field(ds: xr.Dataset, key: str) -> xr.DataArray:
    """One headline field of a Dataset."""
    name, level = FIELDS[key]
    return ds[name].sel(level=level) if level is not None else ds[name]


def demo_world_split(split: str) -> tuple[np.datetime64, np.datetime64]:
    """(start, end) of a split of the demo data config."""
    return load_data_config(config_path("data_demo")).splits[split].bounds


def load_demo_world() -> tuple[xr.Dataset, xr.Dataset]:
    """Truth and analysis of the default demo world, in memory."""
    world = build()
    return open_dataset(world / "truth.zarr").load(), open_dataset(world / "analysis.zarr").load()


def test_inits(truth: xr.Dataset, max_lead_hours: int, every_hours: int,
               period: tuple[np.datetime64, np.datetime64] | None = None) -> np.ndarray:
    """Init times in ``period`` (default: the demo test split) every ``every_hours``, leaving a day of
    history and the longest lead."""
    return period_inits(truth.time.values, demo_world_split("test") if period is None else period, max_lead_hours, every_hours)


def verification(truth: xr.Dataset, forecast: xr.Dataset) -> xr.Dataset:
    """The truth at each forecast's valid time, dims (time, prediction_timedelta, …)."""
    valid = truth.sel(time=forecast.time + forecast.prediction_timedelta)
    return valid.drop_vars("time").assign_coords(time=forecast.time.values)


def lead_rows(system: str, key: str, metric: str, values: xr.DataArray) -> list[dict]:
    """Tidy rows (system, field, lead_hours, metric, value) of a score along ``prediction_timedelta``."""
    leads = values.prediction_timedelta.values / np.timedelta64(1, "h")
    return [{"system": system, "field": key, "lead_hours": int(lead), "metric": metric, "value": float(value)}
            for lead, value in zip(leads, np.asarray(values.values).ravel(), strict=True)]


def rmse_by_lead(forecast: xr.Dataset, truth_at_valid: xr.Dataset, key: str) -> list[float]:
    """Latitude-weighted (ensemble-mean) RMSE per lead over inits and space."""
    dims = ["time", "latitude", "longitude"]
    return ensemble_mean_rmse(field(forecast, key), field(truth_at_valid, key), dims=dims).values.round(3).tolist()


def spread_by_lead(forecast: xr.Dataset, key: str) -> list[float]:
    """Ensemble spread per lead over inits and space."""
    return spread(field(forecast, key), dims=["time", "latitude", "longitude"]).values.round(3).tolist()


def print_table(table: dict[str, dict[str, list[float]]], lead_hours: Sequence[int], shown: Collection[int],
                columns: Sequence[tuple[str, str, str]]) -> None:
    """Print a Markdown table of ``table[field][series]`` (values per lead) at the leads in ``shown``.

    ``columns``: (field, series, header) per column; Z500 to 0.1 m²/s², the others to 3 decimals.
    """
    print("| lead h | " + " | ".join(header for *_, header in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, hours in enumerate(lead_hours):
        if hours in shown:
            cells = [f"{table[f][series][i]:.{1 if f == 'z500' else 3}f}" for f, series, _ in columns]
            print(f"| {hours} | " + " | ".join(cells) + " |")
