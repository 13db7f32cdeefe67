"""Latitude weights, ensemble-mean RMSE (plain and debiased), spread, ACC and activity against direct numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import xarray as xr

from bdlens import grid
from bdlens.metrics import acc, activity_ratio, ensemble_mean_rmse, lat_weights, spread, spread_skill_ratio


@pytest.mark.parametrize("name", ["64x32", "240x121", "1440x721"])
def test_lat_weights_are_exact_cell_areas(name):
    g = grid.GRIDS[name]
    lat = g.latitudes()
    # Independent construction: cell edges halfway between neighbours (poles as outer edges), area
    # of each band by quadrature of cos φ on the unit sphere.
    edges = np.concatenate([[-90.0], (lat[1:] + lat[:-1]) / 2, [90.0]])
    bands = np.array([scipy.integrate.quad(np.cos, *np.deg2rad(edges[i : i + 2]))[0] for i in range(lat.size)])
    assert np.isclose(2 * np.pi * bands.sum(), 4 * np.pi, rtol=1e-12)  # the bands tile the sphere
    weights = lat_weights(xr.DataArray(lat, dims="latitude", coords={"latitude": lat}))
    np.testing.assert_allclose(weights.values, bands / bands.mean(), rtol=1e-10)
    assert weights.dims == ("latitude",) and np.isclose(weights.mean(), 1.0)
    assert (weights.values > 0).all()  # pole rows keep their polar-cap area
    np.testing.assert_allclose(weights.values, weights.values[::-1], rtol=1e-12)


def _ensemble(seed: int = 0, members: int = 6) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    g = grid.GRIDS["64x32"]
    lat, lon = g.latitudes()[::4], g.longitudes()[::8]
    coords = {"latitude": lat, "longitude": lon}
    dims = ("number", "time", "latitude", "longitude")
    truth = xr.DataArray(rng.normal(size=(9, lat.size, lon.size)), dims=dims[1:], coords=coords)
    # A shared error of the ensemble mean plus member noise, so the debiased MSE stays positive.
    centre = truth.values + rng.normal(size=truth.shape)
    forecast = xr.DataArray(centre + rng.normal(scale=1.5, size=(members, *truth.shape)), dims=dims, coords=coords)
    return forecast, truth


def _space_mean(field: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Cell-area weighted mean over the last two axes (latitude, longitude)."""
    w = grid.lat_weights(lat)[:, None]
    return (field * w).sum(axis=(-1, -2)) / (w.sum() * field.shape[-1])


def test_rmse_takes_root_after_time_average():
    forecast, truth = _ensemble()
    lat = forecast.latitude.values
    error2 = (forecast.values.mean(0) - truth.values) ** 2
    expected = np.sqrt(_space_mean(error2, lat).mean())
    np.testing.assert_allclose(ensemble_mean_rmse(forecast, truth).values, expected, rtol=1e-12)
    # ... which is not the mean of the per-time RMSEs
    assert not np.isclose(np.sqrt(_space_mean(error2, lat)).mean(), expected, rtol=1e-6)
    # A forecast without member dim is scored as deterministic.
    np.testing.assert_allclose(ensemble_mean_rmse(forecast.mean("number"), truth).values, expected, rtol=1e-12)


def test_debiased_rmse_subtracts_variance_over_m():
    forecast, truth = _ensemble()
    m = forecast.sizes["number"]
    per_point = (forecast.values.mean(0) - truth.values) ** 2 - forecast.values.var(0, ddof=1) / m
    expected = np.sqrt(_space_mean(per_point, forecast.latitude.values).mean())
    result = ensemble_mean_rmse(forecast, truth, debiased=True)
    np.testing.assert_allclose(result.values, expected, rtol=1e-12)
    assert "debiased" in result.attrs["metric"]


def test_spread_and_spread_skill():
    forecast, truth = _ensemble()
    m = forecast.sizes["number"]
    lat = forecast.latitude.values
    var = _space_mean(forecast.values.var(0, ddof=1), lat).mean()
    mse = _space_mean((forecast.values.mean(0) - truth.values) ** 2, lat).mean()
    np.testing.assert_allclose(spread(forecast).values, np.sqrt(var), rtol=1e-12)
    raw = spread_skill_ratio(forecast, truth, corrected=False)
    corrected = spread_skill_ratio(forecast, truth)
    np.testing.assert_allclose(raw.values, np.sqrt(var / mse), rtol=1e-12)
    np.testing.assert_allclose(corrected.values, np.sqrt(var / mse * (m + 1) / m), rtol=1e-12)
    assert "sqrt((M+1)/M)" in corrected.attrs["correction"] and "raw" in raw.attrs["correction"]


def test_acc_matches_direct_formula_and_is_one_for_perfect_forecast():
    forecast, truth = _ensemble()
    climatology = truth.mean("time") + 0.3
    lat = forecast.latitude.values
    fa = forecast.values.mean(0) - climatology.values
    oa = truth.values - climatology.values
    per_time = _space_mean(fa * oa, lat) / np.sqrt(_space_mean(fa**2, lat) * _space_mean(oa**2, lat))
    np.testing.assert_allclose(acc(forecast, truth, climatology).values, per_time.mean(), rtol=1e-12)
    perfect = truth.expand_dims(number=3)
    np.testing.assert_allclose(acc(perfect, truth, climatology).values, 1.0, rtol=1e-12)


def test_activity_matches_direct_formula_and_scales_with_the_anomalies():
    forecast, truth = _ensemble()
    climatology = truth.mean("time") + 0.3
    lat = forecast.latitude.values
    members2 = ((forecast.values - climatology.values) ** 2).mean(0)
    expected = np.sqrt(_space_mean(members2, lat).mean() / _space_mean((truth.values - climatology.values) ** 2, lat).mean())
    np.testing.assert_allclose(activity_ratio(forecast, truth, climatology).values, expected, rtol=1e-12)
    np.testing.assert_allclose(activity_ratio(truth.expand_dims(number=2), truth, climatology).values, 1.0, rtol=1e-12)
    doubled = climatology + 2.0 * (truth - climatology)  # anomalies twice the truth's: activity 2, whatever the field
    np.testing.assert_allclose(activity_ratio(doubled, truth, climatology).values, 2.0, rtol=1e-12)
    smooth = climatology + 0.0 * truth  # the climatology itself has no activity
    np.testing.assert_allclose(activity_ratio(smooth, truth, climatology).values, 0.0, atol=1e-12)
