"""Rank histograms, Brier scores, reliability data and the energy score against direct computations."""

from __future__ import annotations

import dask.array
import numpy as np
import properscoring
import pytest
import xarray as xr

from bdlens import grid
from bdlens.metrics import brier_score, crps, energy_score, rank_histogram, reliability

M = 5


def _data(seed: int = 0, integer: bool = False, nan: bool = False) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    lat = grid.GRIDS["64x32"].latitudes()[::4]
    coords = {"latitude": lat, "longitude": np.arange(6) * 60.0}
    shape = (M, 10, lat.size, 6)
    draw = (lambda size: rng.integers(0, 3, size=size).astype(np.float64)) if integer else (lambda size: rng.normal(size=size))
    x, y = draw(shape), draw(shape[1:])
    if nan:
        x[1, 2, 3, :] = np.nan
        y[4, 1, 1:3] = np.nan
    dims = ("number", "time", "latitude", "longitude")
    return xr.DataArray(x, dims=dims, coords=coords), xr.DataArray(y, dims=dims[1:], coords=coords)


def test_rank_histogram_matches_direct_count_without_ties():
    forecast, truth = _data(nan=True)
    hist = rank_histogram(forecast, truth, weighted=False, normalize=False)
    x, y = forecast.values, truth.values
    valid = ~(np.isnan(y) | np.isnan(x).any(0))
    ranks = (x < y).sum(0)[valid]
    np.testing.assert_array_equal(hist.values, np.bincount(ranks, minlength=M + 1))
    assert hist.dims == ("rank",) and hist.sizes["rank"] == M + 1
    # Cell-area weighted frequencies: the same count with each point weighted by its row's area.
    w = np.broadcast_to(grid.lat_weights(forecast.latitude.values)[None, :, None], y.shape)[valid]
    weighted = np.bincount(ranks, weights=w, minlength=M + 1)
    np.testing.assert_allclose(rank_histogram(forecast, truth).values, weighted / weighted.sum(), rtol=1e-12)


def test_rank_histogram_breaks_ties_at_random_within_the_tied_range():
    forecast, truth = _data(integer=True)
    pointwise = rank_histogram(forecast, truth, dims=(), weighted=False, normalize=False)
    rank = pointwise.argmax("rank").values
    x, y = forecast.values, truth.values
    below, ties = (x < y).sum(0), (x == y).sum(0)
    assert (pointwise.sum("rank") == 1).all()
    assert ((rank >= below) & (rank <= below + ties)).all()
    assert np.unique(rank[ties > 1] - below[ties > 1]).size > 1  # not always the lowest slot
    again = rank_histogram(forecast, truth, dims=(), weighted=False, normalize=False, seed=0)
    other = rank_histogram(forecast, truth, dims=(), weighted=False, normalize=False, seed=1)
    assert (again == pointwise).all() and not (other == pointwise).all()


def test_rank_histogram_of_all_tied_points_is_flat():
    """Members and truth all equal: the rank is uniform on 0..M, so the histogram is flat within noise."""
    n = 60_000
    forecast = xr.DataArray(np.zeros((M, n)), dims=("number", "time"))
    truth = xr.DataArray(np.zeros(n), dims=("time",))
    counts = rank_histogram(forecast, truth, weighted=False, normalize=False).values
    expected = n / (M + 1)
    # Multinomial counts: 5 standard deviations.
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * (1 - 1 / (M + 1)))


def test_rank_histogram_dask_lazy_and_equal_to_eager():
    forecast, truth = _data(nan=True)
    eager = rank_histogram(forecast, truth)
    lazy = rank_histogram(forecast.chunk({"time": 3}), truth.chunk({"time": 3}))
    assert isinstance(lazy.data, dask.array.Array)
    np.testing.assert_allclose(lazy.values, eager.values, rtol=1e-12)


def test_brier_matches_properscoring_and_fair_brier_matches_pair_kernel():
    forecast, truth = _data(integer=True)
    thresholds = [0.0, 1.0]
    standard = brier_score(forecast, truth, thresholds, dims=())
    for i, t in enumerate(thresholds):
        reference = properscoring.threshold_brier_score(truth.values, np.moveaxis(forecast.values, 0, -1), t)
        np.testing.assert_allclose(standard.isel(threshold=i).transpose(*truth.dims).values, reference, rtol=1e-12)
    # Fair Brier as the fair kernel score of the event indicators e_i:
    # mean_i (e_i − o)² − Σ_{i,j} (e_i − e_j)² / (2M(M−1)).
    e = (forecast.values > 1.0).astype(float)
    o = (truth.values > 1.0).astype(float)
    kernel = ((e - o) ** 2).mean(0) - ((e[:, None] - e[None]) ** 2).sum((0, 1)) / (2 * M * (M - 1))
    fair = brier_score(forecast, truth, [1.0], dims=(), fair=True).isel(threshold=0).transpose(*truth.dims)
    np.testing.assert_allclose(fair.values, kernel, rtol=1e-12, atol=1e-15)


def test_brier_nan_policy_and_threshold_arrays():
    forecast, truth = _data(nan=True)
    per_point_threshold = truth.quantile(0.7, dim="time")
    score = brier_score(forecast, truth, per_point_threshold, dims=())
    any_nan = forecast.isnull().any("number") | truth.isnull()
    assert (score.isnull() == any_nan).all()


def test_reliability_bins_match_direct_count():
    forecast, truth = _data(seed=2)
    out = reliability(forecast, truth, [0.2], dims=("time", "longitude", "latitude")).isel(threshold=0)
    k = (forecast.values > 0.2).sum(0).ravel()
    o = (truth.values > 0.2).ravel()
    w = np.broadcast_to(grid.lat_weights(forecast.latitude.values)[None, :, None], truth.shape).ravel()
    cases = np.bincount(k, weights=w, minlength=M + 1)
    np.testing.assert_allclose(out.bin_fraction.values, cases / cases.sum(), rtol=1e-12)
    with np.errstate(invalid="ignore"):
        frequency = np.bincount(k, weights=w * o, minlength=M + 1) / cases
    np.testing.assert_allclose(out.observed_frequency.values, frequency, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(out.forecast_probability.values, np.arange(M + 1) / M)


@pytest.mark.parametrize("fair", [True, False])
def test_energy_score_matches_brute_force(fair):
    forecast, truth = _data(seed=3)
    result = energy_score(forecast, truth, dims=(), fair=fair)
    w = grid.lat_weights(forecast.latitude.values)[:, None]
    x, y = forecast.values, truth.values
    for t in range(y.shape[0]):
        dist = lambda a, b: np.sqrt((w * (a - b) ** 2).sum())  # noqa: E731
        skill = np.mean([dist(x[i, t], y[t]) for i in range(M)])
        pairs = sum(dist(x[i, t], x[j, t]) for i in range(M) for j in range(M))
        expected = skill - pairs / (2 * M * (M - 1) if fair else 2 * M * M)
        np.testing.assert_allclose(result.values[t], expected, rtol=1e-9)
    lazy = energy_score(forecast.chunk({"time": 4, "latitude": 2}), truth.chunk({"time": 5}), fair=fair)
    assert isinstance(lazy.data, dask.array.Array)
    np.testing.assert_allclose(lazy.values, result.mean().values, rtol=1e-12)


def test_energy_score_of_one_dimensional_vectors_is_the_crps():
    forecast, truth = _data(seed=4)
    es = energy_score(forecast, truth, vector_dims=("longitude",), dims=())
    single = energy_score(forecast.isel(longitude=[2]), truth.isel(longitude=[2]), vector_dims=("longitude",), dims=())
    reference = crps(forecast.isel(longitude=2), truth.isel(longitude=2), dims=())
    np.testing.assert_allclose(single.values, reference.values, rtol=1e-9)
    assert es.dims == ("time", "latitude")
