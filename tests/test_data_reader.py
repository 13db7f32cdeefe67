"""bdlens.data.open_dataset / check_finite: canonical layout from any WB2/ERA5 layout, and clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import xarray as xr
from synthetic import DEMO_LEVELS, SURFACE, UPPER, synthetic_dataset, write_synthetic

from bdlens.data import check_finite, open_dataset
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS


@pytest.fixture(scope="module")
def truth() -> xr.Dataset:
    return synthetic_dataset(times=6, levels=DEMO_LEVELS, upper_variables=UPPER, surface_variables=SURFACE)


@pytest.mark.parametrize(("fmt", "zarr_format", "name"), [("zarr", 2, "w.zarr"), ("zarr", 3, "w.zarr"), ("netcdf", 3, "w.nc")])
def test_round_trip_is_exact_and_lazy(tmp_path, truth, fmt, zarr_format, name):
    path = write_synthetic(tmp_path / name, truth, fmt=fmt, zarr_format=zarr_format)
    ds = open_dataset(path)
    assert all(ds[v].chunks is not None for v in ds.data_vars), "arrays must be dask-backed (lazy)"
    xr.testing.assert_equal(ds.compute(), truth)
    assert ds["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert ds["level"].attrs["units"] == "hPa"


@pytest.mark.parametrize(
    "layout",
    [
        {"flip_lat": True},
        {"lon_180": True},
        {"flip_lat": True, "lon_180": True},
        {"level_pa": True, "descending_levels": True},
        {"rename": {"latitude": "lat", "longitude": "lon", "level": "pressure_level", "time": "valid_time"}},
        {"rename": {"level": "plev", "temperature": "t", "2m_temperature": "t2m"}, "level_pa": True},
    ],
    ids=["flip-lat", "lon-180", "flip+lon-180", "pa-descending", "era5-cds-dims", "cmip-plev+short-names"],
)
def test_non_canonical_inputs_give_identical_canonical_dataset(tmp_path, truth, layout, caplog):
    reference = open_dataset(write_synthetic(tmp_path / "ref.zarr", truth)).compute()
    with caplog.at_level(logging.INFO, logger="bdlens.data.reader"):
        ds = open_dataset(write_synthetic(tmp_path / "odd.nc", truth, fmt="netcdf", **layout)).compute()
    xr.testing.assert_identical(ds[list(reference.data_vars)], reference)
    messages = " ".join(r.getMessage() for r in caplog.records)
    if layout.get("flip_lat"):
        assert "latitude was descending" in messages
    if layout.get("lon_180"):
        assert "longitude ran -180..174.375; rolled to start at 0" in messages
    if layout.get("rename"):
        assert "renamed" in messages


def test_flip_is_a_real_flip(tmp_path, truth):
    raw = xr.open_dataset(write_synthetic(tmp_path / "f.nc", truth, fmt="netcdf", flip_lat=True, lon_180=True))
    ds = open_dataset(tmp_path / "f.nc")
    # the raw file's north-west corner (lat 87.1875, lon −180) is the canonical (last row, lon 180)
    assert raw["latitude"].values[0] == 87.1875 and raw["longitude"].values[0] == -180.0
    np.testing.assert_array_equal(
        ds["temperature"].isel(latitude=-1).sel(longitude=180.0).values, raw["temperature"].isel(latitude=0, longitude=0).values
    )


@pytest.mark.parametrize("grid", ["64x32", "240x121", "1440x721"])
def test_supported_grids_are_accepted(tmp_path, grid):
    truth = synthetic_dataset(grid=grid, times=1, levels=(500,), upper_variables=UPPER[:1], surface_variables=SURFACE[:1])
    ds = open_dataset(write_synthetic(tmp_path / "g.zarr", truth, flip_lat=True))
    assert (ds.sizes["longitude"], ds.sizes["latitude"]) == (GRIDS[grid].nlon, GRIDS[grid].nlat)
    np.testing.assert_array_equal(ds["latitude"].values, GRIDS[grid].latitudes())
    np.testing.assert_array_equal(ds["geopotential"].values, truth["geopotential"].values)


def test_subsets_of_variables_and_levels(tmp_path, truth):
    path = write_synthetic(tmp_path / "w.zarr", truth)
    ds = open_dataset(path, variables=["temperature", "2m_temperature"], levels=[850, 500])
    assert list(ds.data_vars) == ["temperature", "2m_temperature"]
    assert ds["level"].values.tolist() == [500, 850]
    np.testing.assert_array_equal(ds["temperature"].values, truth["temperature"].sel(level=[500, 850]).values)


def test_float32_coordinates_are_snapped_to_the_grid(tmp_path, truth):
    lowp = truth.assign_coords(latitude=truth["latitude"].astype(np.float32) + np.float32(1e-7))
    ds = open_dataset(write_synthetic(tmp_path / "f32.nc", lowp, fmt="netcdf"))
    assert ds["latitude"].dtype == np.float64
    np.testing.assert_array_equal(ds["latitude"].values, GRIDS["64x32"].latitudes())


# ------------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    with pytest.raises(BdlensError, match=r"nowhere\.zarr: no such file"):
        open_dataset(tmp_path / "nowhere.zarr")


def test_missing_variable_names_it_and_the_available_ones(tmp_path, truth):
    path = write_synthetic(tmp_path / "w.zarr", truth, drop=["temperature"])
    with pytest.raises(BdlensError, match=r"w\.zarr: variable\(s\) temperature not found; available: .*geopotential"):
        open_dataset(path, variables=["geopotential", "temperature"])


def test_missing_level(tmp_path, truth):
    path = write_synthetic(tmp_path / "w.zarr", truth)
    with pytest.raises(BdlensError, match=r"level\(s\) 1000 hPa not found; available: 100, 250"):
        open_dataset(path, levels=[500, 1000])


def test_unknown_dims(tmp_path, truth):
    odd = truth[["temperature"]].rename(level="height")
    path = write_synthetic(tmp_path / "w.zarr", odd)
    with pytest.raises(BdlensError, match=r"w\.zarr: variable temperature has unknown dimension\(s\) height"):
        open_dataset(path)


@pytest.mark.parametrize("which", ["latitude", "longitude", "size"])
def test_irregular_or_unsupported_grid(tmp_path, truth, which):
    if which == "latitude":  # a Gaussian-like, not equally spaced latitude axis
        lat = truth["latitude"].values.copy()
        lat[1:-1] += 0.3 * np.sin(np.arange(lat.size - 2))
        odd = truth.assign_coords(latitude=lat)
    elif which == "longitude":
        lon = truth["longitude"].values.copy()
        lon[5] += 1.0
        odd = truth.assign_coords(longitude=lon)
    else:
        odd = truth.isel(longitude=slice(0, 60))
    path = write_synthetic(tmp_path / "w.nc", odd, fmt="netcdf")
    with pytest.raises(BdlensError, match=r"w\.nc: grid .* not one of the supported equiangular grids"):
        open_dataset(path)


def test_irregular_time_axis(tmp_path):
    # a 6-hourly axis with one time off the lattice (15 UTC)
    times = np.datetime64("2000-01-01", "ns") + np.array([0, 6, 12, 15, 18, 24, 30], "timedelta64[h]")
    path = write_synthetic(tmp_path / "w.zarr", times=times)
    with pytest.raises(BdlensError, match=r"w\.zarr: irregular time axis: spacing is not a multiple of 6h before 2000-01-01T15:00"):
        open_dataset(path)


def test_missing_times_are_logged_not_raised(tmp_path, caplog):
    times = np.datetime64("2000-01-01", "ns") + np.array([0, 6, 18, 24], "timedelta64[h]")
    with caplog.at_level(logging.WARNING, logger="bdlens.data.reader"):
        ds = open_dataset(write_synthetic(tmp_path / "w.zarr", times=times))
    assert ds.sizes["time"] == 4
    assert "1 time step(s) missing" in caplog.text and "2000-01-01T12:00" in caplog.text


def test_nan_in_a_requested_field_is_named(tmp_path, truth):
    path = write_synthetic(tmp_path / "w.zarr", truth, nans={"temperature": [2, 4]})
    ds = open_dataset(path, variables=["geopotential", "temperature"])
    with pytest.raises(BdlensError, match=r"variable temperature has NaN/inf values at 2000-01-01T12:00, 2000-01-02T00:00"):
        check_finite(ds, source=path)
    check_finite(ds, variables=["geopotential"])  # the clean field passes


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.nc"
    path.write_text("not a netCDF file")
    with pytest.raises(BdlensError, match=r"broken\.nc: cannot be read as a netCDF file"):
        open_dataset(path)


def test_forecast_layout_is_accepted_in_canonical_dim_order(tmp_path, truth):
    fc = xr.concat([truth.isel(time=slice(0, 2)) + k for k in range(3)], dim=xr.DataArray([0, 1, 2], dims="number", name="number"))
    fc = fc.expand_dims(prediction_timedelta=np.array([6, 12], "timedelta64[h]").astype("timedelta64[ns]"))
    fc = fc.transpose("latitude", "longitude", "prediction_timedelta", "time", "number", "level")
    ds = open_dataset(write_synthetic(tmp_path / "fc.zarr", fc, flip_lat=True))
    assert ds["temperature"].dims == ("number", "time", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds["2m_temperature"].dims == ("number", "time", "prediction_timedelta", "latitude", "longitude")
    np.testing.assert_array_equal(
        ds["temperature"].isel(number=2, prediction_timedelta=1).values, truth["temperature"].isel(time=slice(0, 2)).values + 2
    )
