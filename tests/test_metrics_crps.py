"""CRPS against independent references: brute force O(M²), properscoring, xskillscore and scores."""

from __future__ import annotations

import dask.array
import numpy as np
import properscoring
import pytest
import scores.probability
import xarray as xr
import xskillscore

from bdlens import grid
from bdlens.errors import BdlensError
from bdlens.metrics import crps

M = 7


def brute_force_crps(members: np.ndarray, truth: float, fair: bool) -> float:
    """CRPS from the O(M²) kernel form, NaN members dropped."""
    x = members[~np.isnan(members)]
    m = x.size
    if np.isnan(truth) or m < (2 if fair else 1):
        return np.nan
    pairs = np.abs(x[:, None] - x[None, :]).sum()
    return np.abs(x - truth).mean() - pairs / (2 * m * (m - 1) if fair else 2 * m * m)


@pytest.fixture
def tied_data() -> tuple[xr.DataArray, xr.DataArray]:
    """Integer-valued members and truth (many ties) with NaN members, all-NaN points and NaN truth."""
    rng = np.random.default_rng(42)
    lat = grid.GRIDS["64x32"].latitudes()[::4]
    x = rng.integers(0, 6, size=(M, 12, lat.size, 5)).astype(np.float64)
    y = rng.integers(0, 6, size=(12, lat.size, 5)).astype(np.float64)
    x[2, ::3, 1, :] = np.nan
    x[:, 4, 2, 3] = np.nan
    x[1:, 5, 3, 1] = np.nan  # a single valid member
    y[7, 0, :] = np.nan
    dims = ("number", "time", "latitude", "longitude")
    coords = {"latitude": lat, "longitude": np.arange(5) * 72.0}
    return xr.DataArray(x, dims=dims, coords=coords), xr.DataArray(y, dims=dims[1:], coords=coords)


def _brute(forecast: xr.DataArray, truth: xr.DataArray, fair: bool) -> np.ndarray:
    x = np.moveaxis(forecast.values, 0, -1)
    y = truth.values
    return np.vectorize(lambda i: brute_force_crps(x.reshape(-1, M)[i], y.ravel()[i], fair))(np.arange(y.size)).reshape(y.shape)


@pytest.mark.parametrize("fair", [True, False])
def test_crps_matches_brute_force_with_ties_and_nans(tied_data, fair):
    forecast, truth = tied_data
    expected = _brute(forecast, truth, fair)
    skipping = crps(forecast, truth, dims=(), fair=fair, skipna=True)
    np.testing.assert_allclose(skipping.values, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    # Default policy: any NaN member makes the point NaN, and nothing else changes.
    strict = crps(forecast, truth, dims=(), fair=fair).values
    any_nan = forecast.isnull().any("number").values | truth.isnull().values
    assert np.array_equal(np.isnan(strict), any_nan)
    np.testing.assert_allclose(strict[~any_nan], expected[~any_nan], rtol=1e-12)


def test_standard_crps_matches_properscoring_and_xskillscore(tied_data):
    forecast, truth = tied_data
    ours = crps(forecast, truth, dims=(), fair=False, skipna=True).values
    reference = properscoring.crps_ensemble(truth.values, forecast.values, axis=0)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, equal_nan=True)
    xs = xskillscore.crps_ensemble(truth, forecast, member_dim="number", dim=[])
    np.testing.assert_allclose(ours, xs.transpose(*truth.dims).values, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize(("fair", "method"), [(True, "fair"), (False, "ecdf")])
def test_crps_matches_scores(tied_data, fair, method):
    forecast, truth = tied_data
    ours = crps(forecast, truth, dims=(), fair=fair, skipna=True).values
    reference = scores.probability.crps_for_ensemble(forecast, truth, "number", method=method, preserve_dims="all")
    reference = reference.transpose(*truth.dims).values
    # scores gives ±inf/NaN where a single member is valid under "fair"; bdlens gives NaN (documented).
    comparable = np.isfinite(reference)
    assert np.isnan(ours[~comparable]).all()
    np.testing.assert_allclose(ours[comparable], reference[comparable], rtol=1e-6)


def test_fair_minus_standard_is_spread_term_over_m_minus_one():
    rng = np.random.default_rng(3)
    forecast = xr.DataArray(rng.normal(size=(M, 50)), dims=("number", "time"))
    truth = xr.DataArray(rng.normal(size=50), dims=("time",))
    x = forecast.values
    standard_spread = np.abs(x[:, None] - x[None, :]).sum(axis=(0, 1)) / (2 * M * M)
    difference = crps(forecast, truth, dims=(), fair=True) - crps(forecast, truth, dims=(), fair=False)
    np.testing.assert_allclose(difference.values, -standard_spread / (M - 1), rtol=1e-10)


def test_crps_accurate_for_large_offsets():
    """Geopotential-like values (5e4 m²/s² with 50 m²/s² spread) keep the 1e-6 agreement."""
    rng = np.random.default_rng(4)
    x = 5.4e4 + 50 * rng.normal(size=(50, 200))
    y = 5.4e4 + 50 * rng.normal(size=200)
    ours = crps(xr.DataArray(x, dims=("number", "time")), xr.DataArray(y, dims=("time",)), dims=()).values
    expected = [brute_force_crps(x[:, i], y[i], fair=True) for i in range(200)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9)


def test_crps_reduction_is_area_weighted_and_stated(tied_data):
    forecast, truth = tied_data
    pointwise = _brute(forecast, truth, fair=True)
    w = np.broadcast_to(grid.lat_weights(forecast.latitude.values)[None, :, None], pointwise.shape)
    valid = ~np.isnan(pointwise)
    expected = (pointwise[valid] * w[valid]).sum() / w[valid].sum()
    result = crps(forecast, truth, skipna=True)
    assert result.ndim == 0
    np.testing.assert_allclose(result.values, expected, rtol=1e-12)
    assert "latitude (cell-area weighted)" in result.attrs["reduced_over"]
    assert "time" in result.attrs["reduced_over"]
    per_time = crps(forecast, truth, dims=("latitude", "longitude"), skipna=True)
    assert per_time.dims == ("time",)


def test_crps_dask_stays_lazy_and_matches_eager(tied_data):
    forecast, truth = tied_data
    eager = crps(forecast, truth, dims=("latitude", "longitude"), skipna=True)
    chunked = crps(forecast.chunk({"time": 5, "number": 3, "latitude": 4}), truth.chunk({"time": 4}), dims=("latitude", "longitude"), skipna=True)
    assert isinstance(chunked.data, dask.array.Array)
    np.testing.assert_allclose(chunked.compute().values, eager.values, rtol=1e-12, equal_nan=True)


def test_crps_bad_input_raises(tied_data):
    forecast, truth = tied_data
    with pytest.raises(BdlensError, match="no member dimension 'member'"):
        crps(forecast, truth, member_dim="member")
    with pytest.raises(BdlensError, match="at least 2 ensemble members"):
        crps(forecast.isel(number=[0]), truth)
    with pytest.raises(BdlensError, match="not dimensions"):
        crps(forecast, truth, dims=("step",))
