"""Small synthetic WeatherBench2-layout datasets for tests (import with ``from synthetic import ...``).

:func:`synthetic_dataset` builds an in-memory Dataset in the canonical bdlens layout (docs/science.md §1) with
physically plausible magnitudes (standard-atmosphere geopotential and temperature, a jet-like zonal
wind, MSLP around 1013 hPa) plus seeded noise that differs at every time, so a test that picks the
wrong time, level or variable sees different numbers. :func:`write_synthetic` writes it to disk as
zarr (v2 or v3) or netCDF, optionally in a non-canonical layout (descending latitude, −180…180
longitude, alias dim names, level in Pa) and with defects (dropped variables, NaNs, chosen times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from bdlens.grid import GRIDS

UPPER = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind")
SURFACE = ("mean_sea_level_pressure", "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")
DEMO_LEVELS = (100, 250, 400, 500, 600, 700, 850, 925)

_UNITS = {
    "geopotential": "m2 s-2",
    "temperature": "K",
    "u_component_of_wind": "m s-1",
    "v_component_of_wind": "m s-1",
    "specific_humidity": "kg kg-1",
    "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa",
    "2m_temperature": "K",
    "10m_u_component_of_wind": "m s-1",
    "10m_v_component_of_wind": "m s-1",
    "land_sea_mask": "1",
    "geopotential_at_surface": "m2 s-2",
}


def _height_m(level_hpa: np.ndarray) -> np.ndarray:
    # International standard atmosphere (troposphere formula), good enough for plausible magnitudes.
    return 44330.8 * (1.0 - (level_hpa / 1013.25) ** 0.190263)


def _climate(name: str, level: np.ndarray | None, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Time-independent base field, shape (Z, H, W) for upper-air names or (H, W) otherwise."""
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    wave = np.cos(phi) * np.cos(3 * lam)
    jet = 30.0 * np.sin(2 * phi) ** 2
    if level is not None:
        z = _height_m(level.astype(np.float64))[:, None, None]
        fields = {
            "geopotential": 9.80665 * z - 2000.0 * np.sin(phi) ** 2 + 300.0 * wave,
            "temperature": np.maximum(288.15 - 0.0065 * z, 216.65) - 25.0 * np.sin(phi) ** 2 + 3.0 * wave,
            "u_component_of_wind": (z / 10000.0) * jet + 2.0 * wave,
            "v_component_of_wind": 3.0 * np.sin(lam) * np.cos(phi),
            "specific_humidity": 0.015 * np.exp(-z / 2500.0) * np.cos(phi) ** 2,
        }
        base = fields.get(name, wave)
        return np.broadcast_to(base, (level.size, lat.size, lon.size))
    fields = {
        "mean_sea_level_pressure": 101325.0 + 1500.0 * wave,
        "surface_pressure": 100000.0 + 1500.0 * wave,
        "2m_temperature": 300.0 - 45.0 * np.sin(phi) ** 2 + 2.0 * wave,
        "10m_u_component_of_wind": 0.2 * jet - 3.0 * np.cos(phi) ** 4,
        "10m_v_component_of_wind": 2.0 * np.sin(lam) * np.cos(phi),
        "land_sea_mask": (wave > 0.2).astype(np.float64),
        "geopotential_at_surface": 9.80665 * 800.0 * np.clip(wave, 0.0, None),
    }
    return np.broadcast_to(fields.get(name, wave), (lat.size, lon.size))


def _noise_scale(base: np.ndarray) -> float:
    return 0.02 * float(np.abs(base).mean()) + 0.1


def synthetic_dataset(
    grid: str = "64x32",
    times: int | Sequence = 8,
    start: str = "2000-01-01T00",
    step: str = "6h",
    levels: Sequence[int] = (500, 850),
    upper_variables: Sequence[str] = UPPER[:2],
    surface_variables: Sequence[str] = SURFACE[:2],
    constant_variables: Sequence[str] = (),
    seed: int = 0,
    dtype: str = "float32",
) -> xr.Dataset:
    """A canonical-layout Dataset: ``times`` regular steps from ``start`` (or explicit datetimes).

    Upper-air variables have dims (time, level, latitude, longitude), surface ones (time, latitude,
    longitude), constants (latitude, longitude). Each time adds its own seeded noise (2 % of the
    field's magnitude) on top of a fixed base field.
    """
    g = GRIDS[grid]
    lat, lon = g.latitudes(), g.longitudes()
    if isinstance(times, int):
        time = np.datetime64(start, "ns") + np.arange(times) * pd.Timedelta(step).to_timedelta64()
    else:
        time = np.asarray(times, dtype="datetime64[ns]")
    level = np.asarray(levels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    data_vars = {}
    for name in upper_variables:
        base = _climate(name, level, lat, lon)
        noise = rng.standard_normal((time.size, *base.shape)) * _noise_scale(base)
        data_vars[name] = (("time", "level", "latitude", "longitude"), (base + noise).astype(dtype), {"units": _UNITS.get(name, "1")})
    for name in surface_variables:
        base = _climate(name, None, lat, lon)
        noise = rng.standard_normal((time.size, *base.shape)) * _noise_scale(base)
        data_vars[name] = (("time", "latitude", "longitude"), (base + noise).astype(dtype), {"units": _UNITS.get(name, "1")})
    for name in constant_variables:
        data_vars[name] = (("latitude", "longitude"), _climate(name, None, lat, lon).astype(dtype), {"units": _UNITS.get(name, "1")})
    coords = {
        "time": time,
        "latitude": ("latitude", lat, {"units": "degrees_north"}),
        "longitude": ("longitude", lon, {"units": "degrees_east"}),
    }
    if upper_variables:
        coords["level"] = ("level", level, {"units": "hPa"})
    return xr.Dataset(data_vars, coords=coords, attrs={"title": "bdlens synthetic test data", "seed": seed})


def non_canonical(
    ds: xr.Dataset,
    flip_lat: bool = False,
    lon_180: bool = False,
    level_pa: bool = False,
    descending_levels: bool = False,
    rename: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """``ds`` rewritten the way other producers store it (ERA5 from CDS is north→south, −180…180 is common)."""
    if flip_lat:
        ds = ds.isel(latitude=slice(None, None, -1))
    if lon_180:
        lon = ds["longitude"].values
        wrapped = np.where(lon >= 180.0, lon - 360.0, lon)
        ds = ds.assign_coords(longitude=wrapped).sortby("longitude")
    if descending_levels and "level" in ds.dims:
        ds = ds.isel(level=slice(None, None, -1))
    if level_pa and "level" in ds.dims:
        ds = ds.assign_coords(level=("level", ds["level"].values * 100.0, {"units": "Pa"}))
    if rename:
        ds = ds.rename(dict(rename))
    return ds


def write_synthetic(
    path: str | Path,
    ds: xr.Dataset | None = None,
    fmt: str = "zarr",
    zarr_format: int = 3,
    flip_lat: bool = False,
    lon_180: bool = False,
    level_pa: bool = False,
    descending_levels: bool = False,
    rename: Mapping[str, str] | None = None,
    drop: Sequence[str] = (),
    nans: Mapping[str, Sequence[int]] | None = None,
    time_chunk: int | None = 4,
    **dataset_kwargs,
) -> Path:
    """Write ``ds`` (default: ``synthetic_dataset(**dataset_kwargs)``) to ``path`` and return the path.

    ``fmt``: "zarr" (``zarr_format`` 2 or 3) or "netcdf". ``drop``: variables to leave out.
    ``nans``: {variable: [time indices]} set to NaN (the whole field at those times). The layout
    options are those of :func:`non_canonical`; they are applied after the defects. ``time_chunk``:
    times per stored chunk (None: one chunk).
    """
    path = Path(path)
    ds = synthetic_dataset(**dataset_kwargs) if ds is None else ds
    ds = ds.drop_vars(list(drop))
    for name, indices in (nans or {}).items():
        values = ds[name].values.copy()
        values[list(indices)] = np.nan
        ds[name] = ds[name].copy(data=values)
    ds = non_canonical(ds, flip_lat, lon_180, level_pa, descending_levels, rename)
    if "time" in ds.dims and time_chunk:
        ds = ds.chunk({"time": time_chunk})  # stored chunks of a few times, like real WB2/ERA5 stores
    if fmt == "zarr":
        ds.to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=zarr_format == 2)
    elif fmt == "netcdf":
        ds.to_netcdf(path, engine="netcdf4")
    else:
        raise ValueError(f"unknown format {fmt!r}; use 'zarr' or 'netcdf'")
    return path


def synthetic_forecast(
    truth: xr.Dataset,
    n_inits: int = 3,
    lead_hours: Sequence[int] = (6, 12, 24),
    weight_samples: int = 3,
    draws: int = 2,
    epistemic_std: float = 0.5,
    aleatoric_std: float = 1.0,
    design: bool = True,
    seed: int = 1,
) -> xr.Dataset:
    """An ensemble in the bdlens forecast layout: truth at valid time + b_k + e_kj (Gaussian, in units of
    each field's noise scale), K = ``weight_samples`` × J = ``draws`` members; member i has k = i // J,
    j = i % J (coordinates ``weight_sample`` / ``perturbation_draw`` unless ``design`` is False). The
    first ``n_inits`` truth times are the inits; valid times past the truth are NaN.
    """
    rng = np.random.default_rng(seed)
    inits = truth["time"].values[:n_inits]
    leads = pd.to_timedelta(list(lead_hours), unit="h")
    out = {}
    for name, da in truth.data_vars.items():
        if "time" not in da.dims:
            continue
        at_valid = xr.concat(
            [da.reindex(time=inits + lead.to_timedelta64()).assign_coords(time=inits) for lead in leads],
            dim=pd.Index(leads, name="prediction_timedelta"),
        ).transpose("time", "prediction_timedelta", ...)
        scale = _noise_scale(np.asarray(da.isel(time=0).values))
        shape = at_valid.shape
        between = rng.standard_normal((weight_samples, 1, *shape)) * epistemic_std
        within = rng.standard_normal((weight_samples, draws, *shape)) * aleatoric_std
        noise = (between + within).reshape(weight_samples * draws, *shape) * scale
        out[name] = (at_valid + xr.DataArray(noise, dims=("number", *at_valid.dims))).astype(np.float32).assign_attrs(da.attrs)
    ds = xr.Dataset(out).transpose("number", "time", "prediction_timedelta", ...)
    members = np.arange(weight_samples * draws)
    ds = ds.assign_coords(number=members)
    if design:
        ds = ds.assign_coords(weight_sample=("number", members // draws), perturbation_draw=("number", members % draws))
    return ds
