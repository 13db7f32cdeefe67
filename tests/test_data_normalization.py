"""Normalisation statistics: latitude-weighted mean/std against brute force, and the cache key."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from synthetic import synthetic_dataset

import bdlens.data.normalization as normalization
from bdlens.data import NormStats, compute_stats, default_stats_path, load_or_compute_stats
from bdlens.errors import BdlensError

TRAIN = ("2000-01-01T06", "2000-01-02T12")


def brute_force(ds: xr.Dataset, name: str, level: int | None, time_range) -> tuple[float, float]:
    """Area-weighted mean and std of one 2-D field over the time range, by the textbook formula."""
    da = ds[name].sel(time=slice(*time_range))
    if level is not None:
        da = da.sel(level=level)
    lat = ds["latitude"].values
    half = abs(lat[1] - lat[0]) / 2
    area = np.sin(np.deg2rad(np.minimum(lat + half, 90))) - np.sin(np.deg2rad(np.maximum(lat - half, -90)))
    x = da.values.astype(np.float64)
    weights = np.broadcast_to(area[None, :, None], x.shape)
    mean = np.average(x, weights=weights)
    return mean, np.sqrt(np.average((x - mean) ** 2, weights=weights))


@pytest.mark.parametrize("grid", ["64x32", "240x121"])
def test_stats_match_brute_force(grid):
    ds = synthetic_dataset(grid=grid, times=8, levels=(250, 850), surface_variables=("2m_temperature",))
    stats = compute_stats(ds, TRAIN)
    assert stats.levels == (250, 850)
    for name in ("geopotential", "temperature"):
        assert stats.mean[name].shape == (2,)
        for z, level in enumerate((250, 850)):
            mean, std = brute_force(ds, name, level, TRAIN)
            np.testing.assert_allclose([stats.mean[name][z], stats.std[name][z]], [mean, std], rtol=1e-9)
    mean, std = brute_force(ds, "2m_temperature", None, TRAIN)
    assert stats.mean["2m_temperature"].shape == ()
    np.testing.assert_allclose([stats.mean["2m_temperature"], stats.std["2m_temperature"]], [mean, std], rtol=1e-9)
    # the weighting matters: the unweighted mean of 2m temperature is colder (poles over-counted)
    unweighted = ds["2m_temperature"].sel(time=slice(*TRAIN)).values.mean(dtype=np.float64)
    assert stats.mean["2m_temperature"] - unweighted > 1.0


def test_tendency_stats_match_brute_force():
    ds = synthetic_dataset(times=12, levels=(500,))
    ds = ds.drop_sel(time=ds["time"].values[6])  # a gap: pairs across it are skipped, not mismatched
    stats = compute_stats(ds, TRAIN, ["temperature"], difference_step="12h")
    times = ds["time"].sel(time=slice(*TRAIN)).values
    pairs = [(t, t + np.timedelta64(12, "h")) for t in times if t + np.timedelta64(12, "h") in times]
    assert len(pairs) == 3  # 06→18, 12→00, 18→06; the pair 00→12 on Jan 2 would need the dropped time
    diffs = np.stack([ds["temperature"].sel(time=b, level=500).values - ds["temperature"].sel(time=a, level=500).values for a, b in pairs])
    lat = np.deg2rad(ds["latitude"].values)
    area = np.sin(lat + np.deg2rad(2.8125)) - np.sin(lat - np.deg2rad(2.8125))
    w = np.broadcast_to(area[None, :, None], diffs.shape)
    mean = np.average(diffs.astype(np.float64), weights=w)
    std = np.sqrt(np.average((diffs.astype(np.float64) - mean) ** 2, weights=w))
    np.testing.assert_allclose([stats.mean["temperature"][0], stats.std["temperature"][0]], [mean, std], rtol=1e-6)
    assert stats.key != compute_stats(ds, TRAIN, ["temperature"]).key


def test_constant_field_gets_unit_std_and_constants_reduce_over_space():
    ds = synthetic_dataset(times=4, levels=(500,), constant_variables=("land_sea_mask",))
    ds["calm"] = xr.full_like(ds["2m_temperature"], 5.0)
    stats = compute_stats(ds)
    assert stats.std["calm"] == 1.0 and stats.mean["calm"] == pytest.approx(5.0)
    mask = ds["land_sea_mask"].values
    lat = np.deg2rad(ds["latitude"].values)
    w = (np.sin(lat + np.deg2rad(2.8125)) - np.sin(lat - np.deg2rad(2.8125)))[:, None] * np.ones_like(mask)
    assert stats.mean["land_sea_mask"] == pytest.approx(np.average(mask, weights=w), rel=1e-12)


def test_save_load_round_trip(tmp_path):
    stats = compute_stats(synthetic_dataset(times=4), TRAIN)
    loaded = NormStats.load(stats.save(tmp_path / "s.json"))
    assert loaded.key == stats.key and loaded.levels == stats.levels
    for name in stats.mean:
        np.testing.assert_array_equal(loaded.mean[name], stats.mean[name])
        np.testing.assert_array_equal(loaded.std[name], stats.std[name])
    np.testing.assert_array_equal(loaded.field("temperature", [850])[1], stats.std["temperature"][[1]])


def test_cache_is_reused_only_for_the_same_data_times_and_variables(tmp_path, monkeypatch):
    ds = synthetic_dataset(times=12)
    path = default_stats_path(tmp_path / "truth.zarr")
    assert path.name == "truth.zarr.normstats.json"
    first = load_or_compute_stats(ds, path, TRAIN)
    assert path.exists()

    calls = []
    real = normalization.compute_stats
    monkeypatch.setattr(normalization, "compute_stats", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))

    again = load_or_compute_stats(ds, path, TRAIN)
    assert calls == [] and again.key == first.key  # reused

    later = ("2000-01-02T00", "2000-01-03T18")
    moved = load_or_compute_stats(ds, path, later)
    assert len(calls) == 1 and moved.key != first.key
    np.testing.assert_allclose(moved.mean["temperature"][0], brute_force(ds, "temperature", 500, later)[0], rtol=1e-9)
    assert NormStats.load(path).key == moved.key  # the file now holds the new range

    fewer = load_or_compute_stats(ds, path, later, variables=["temperature"])
    assert len(calls) == 2 and set(fewer.mean) == {"temperature"}

    rebuilt = synthetic_dataset(times=12, seed=1)
    rebuilt.attrs["seed"] = 1
    load_or_compute_stats(rebuilt, path, later, variables=["temperature"])
    assert len(calls) == 3  # other data (different attrs) at the same path is not reused

    path.write_text("{ not json")
    load_or_compute_stats(rebuilt, path, later, variables=["temperature"])
    assert len(calls) == 4


def test_bad_training_period_is_a_clear_error():
    ds = synthetic_dataset(times=4)
    with pytest.raises(BdlensError, match="no data in the time range 2010-01-01"):
        compute_stats(ds, ("2010-01-01", "2010-12-31"))
    ds["temperature"][1, 0, 3, 3] = np.nan
    with pytest.raises(BdlensError, match="temperature has NaN/inf values in the training period"):
        compute_stats(ds)
