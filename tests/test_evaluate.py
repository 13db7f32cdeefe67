"""``bdlens evaluate`` end to end on tiny stores: alignment, outputs, errors, a dask.distributed cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scores.probability
import xarray as xr

from bdlens import grid
from bdlens.cli import main
from bdlens.evaluate import evaluate, write

M = 4
LEADS = pd.to_timedelta([6, 12], unit="h")


def make_truth(grid_name: str = "64x32", n_times: int = 8, seed: int = 0) -> xr.Dataset:
    g = grid.GRIDS[grid_name]
    rng = np.random.default_rng(seed)
    coords = {
        "time": pd.date_range("2020-01-01", periods=n_times, freq="6h"),
        "level": [500, 850],
        "latitude": g.latitudes(),
        "longitude": g.longitudes(),
    }
    shape = (n_times, g.nlat, g.nlon)
    return xr.Dataset(
        {
            "temperature": (("time", "level", "latitude", "longitude"), 250 + rng.normal(size=(n_times, 2, g.nlat, g.nlon))),
            "2m_temperature": (("time", "latitude", "longitude"), 280 + rng.normal(size=shape)),
        },
        coords=coords,
    )


def make_forecast(truth: xr.Dataset, n_inits: int, noise: float = 1.0, members: int = M, seed: int = 1) -> xr.Dataset:
    """Members = truth at valid time + noise, for the first ``n_inits`` times as initialisations."""
    rng = np.random.default_rng(seed)
    inits = truth["time"].values[:n_inits]
    out = {}
    for name, da in truth.data_vars.items():
        at_valid = xr.concat(
            [da.reindex(time=inits + lead).assign_coords(time=inits) for lead in LEADS], dim=pd.Index(LEADS, name="prediction_timedelta")
        ).transpose("time", "prediction_timedelta", ...)
        out[name] = at_valid + noise * xr.DataArray(rng.normal(size=(members, *at_valid.shape)), dims=("number", *at_valid.dims))
    return xr.Dataset(out).transpose("number", "time", "prediction_timedelta", ...)


def store(ds: xr.Dataset, path: Path) -> str:
    ds.to_zarr(path, mode="w", consolidated=False)
    return str(path)


def test_perfect_forecast_scores_zero_only_with_valid_time_alignment(tmp_path):
    truth = make_truth()
    perfect = make_forecast(truth, n_inits=6, noise=0.0)
    out = tmp_path / "m.nc"
    rc = main(["-q", "evaluate", store(perfect, tmp_path / "perfect.zarr"), "--truth", store(truth, tmp_path / "t.zarr"), "--out", str(out)])
    assert rc == 0
    result = xr.open_dataset(out, decode_timedelta=True)
    for metric in ("crps", "crps_standard", "rmse", "spread"):
        np.testing.assert_allclose(result["temperature"].sel(metric=metric).values, 0.0, atol=1e-12)
        np.testing.assert_allclose(result["2m_temperature"].sel(metric=metric).values, 0.0, atol=1e-12)
    assert result["temperature"].dims == ("forecast", "metric", "prediction_timedelta", "level")
    assert list(result.forecast.values) == ["perfect"]
    assert "cell-area" in result.attrs["reduced_over"]


def test_metrics_match_scores_on_partially_overlapping_times(tmp_path):
    truth = make_truth(n_times=8)
    forecast = make_forecast(truth, n_inits=8, noise=1.0)  # the last inits' valid times run past the truth
    result = evaluate({"f": forecast.chunk({"time": 3})}, truth)
    assert result["temperature"].notnull().all()
    w = grid.lat_weights(truth.latitude.values)
    for lead in LEADS:
        valid_inits = forecast.time.values[forecast.time.values + lead.to_timedelta64() <= truth.time.values[-1]]
        fc = forecast["temperature"].sel(prediction_timedelta=lead, time=valid_inits, level=850)
        obs = truth["temperature"].sel(time=valid_inits + lead.to_timedelta64(), level=850).assign_coords(time=valid_inits)
        weights = xr.DataArray(w, dims="latitude", coords={"latitude": truth.latitude})
        expected = scores.probability.crps_for_ensemble(fc, obs, "number", method="fair", weights=weights)
        got = result["temperature"].sel(forecast="f", metric="crps", prediction_timedelta=lead, level=850)
        np.testing.assert_allclose(got.values, expected.values, rtol=1e-9)
        rmse = np.sqrt(((fc.mean("number") - obs) ** 2).weighted(weights).mean().item())
        np.testing.assert_allclose(result["temperature"].sel(forecast="f", metric="rmse", prediction_timedelta=lead, level=850), rmse, rtol=1e-9)
    hist = result["temperature_rank_histogram"].sel(forecast="f")
    np.testing.assert_allclose(hist.sum("rank"), 1.0)
    assert hist.sizes["rank"] == M + 1


def test_csv_table_and_two_forecasts(tmp_path):
    truth = make_truth()
    paths = [store(make_forecast(truth, 6, noise=s, seed=s), tmp_path / f"{n}.zarr") for n, s in (("good", 1), ("wide", 3))]
    out = tmp_path / "m.csv"
    assert main(["-q", "evaluate", *paths, "--truth", store(truth, tmp_path / "t.zarr"), "--out", str(out), "--variables", "2m_temperature"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["forecast", "variable", "level", "lead_hours", "metric", "bin", "value"]
    crps = table[(table.metric == "crps")].set_index(["forecast", "lead_hours"])["value"]
    assert (crps.loc["wide"] > crps.loc["good"]).all()
    assert set(table.variable) == {"2m_temperature"}
    assert len(table[(table.metric == "rank_histogram") & (table.forecast == "good")]) == 2 * (M + 1)


def test_decomposition_metrics_when_design_coords_present():
    truth = make_truth(n_times=6)
    forecast = make_forecast(truth, 4, members=6).assign_coords(
        weight_sample=("number", [0, 0, 1, 1, 2, 2]), perturbation_draw=("number", [0, 1] * 3)
    )
    result = evaluate({"bayes": forecast}, truth, variables=["2m_temperature"])["2m_temperature"]
    assert {"epistemic_variance", "aleatoric_variance", "mixture_crps_gap"} <= set(result.metric.values.tolist())
    assert (result.sel(metric="mixture_crps_gap") >= 0).all()
    # Independent noise for every member: all variance is aleatoric (~1), epistemic ~0.
    np.testing.assert_allclose(result.sel(metric="aleatoric_variance"), 1.0, rtol=0.05)


def test_distributed_scheduler_gives_the_same_result(tmp_path):
    distributed = pytest.importorskip("distributed")
    truth = make_truth(n_times=6)
    forecast = make_forecast(truth, 4)
    truth_path, forecast_path = store(truth, tmp_path / "t.zarr"), store(forecast, tmp_path / "f.zarr")
    local, remote = tmp_path / "local.nc", tmp_path / "remote.nc"
    assert main(["-q", "evaluate", forecast_path, "--truth", truth_path, "--out", str(local)]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert main(["-q", "evaluate", forecast_path, "--truth", truth_path, "--out", str(remote), "--scheduler", cluster.scheduler_address]) == 0
    xr.testing.assert_allclose(xr.open_dataset(local), xr.open_dataset(remote))


@pytest.fixture
def stores(tmp_path) -> dict[str, str]:
    truth = make_truth(n_times=6)
    forecast = make_forecast(truth, 4)
    return {
        "truth": store(truth, tmp_path / "truth.zarr"),
        "forecast": store(forecast, tmp_path / "forecast.zarr"),
        "coarse_truth": store(make_truth("240x121", n_times=6), tmp_path / "coarse.zarr"),
        "late_truth": store(truth.assign_coords(time=truth.time + np.timedelta64(30, "D")), tmp_path / "late.zarr"),
        "no_members": store(forecast.isel(number=0, drop=True), tmp_path / "nomembers.zarr"),
        "one_member": store(forecast.isel(number=[0]), tmp_path / "onemember.zarr"),
        "no_t2m_truth": store(truth.drop_vars("2m_temperature"), tmp_path / "not2m.zarr"),
    }


@pytest.mark.parametrize(
    ("forecast", "truth", "message"),
    [
        ("forecast", "coarse_truth", "64x32 grid but the truth on 240x121"),
        ("forecast", "late_truth", "no valid time"),
        ("no_members", "truth", "no member dimension 'number'"),
        ("one_member", "truth", "only one member"),
        ("forecast", "no_t2m_truth", "truth lacks variable(s) 2m_temperature"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(stores, tmp_path, capsys, forecast, truth, message):
    out = tmp_path / "m.nc"
    assert main(["-q", "evaluate", stores[forecast], "--truth", stores[truth], "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_needs_overwrite_and_failed_writes_leave_nothing(stores, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.csv"
    out.write_text("keep me")
    args = ["-q", "evaluate", stores["forecast"], "--truth", stores["truth"], "--out", str(out), "--variables", "2m_temperature"]
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main([*args, "--overwrite"]) == 2  # not a metrics file bdlens wrote
    assert "not a bdlens metrics file" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    out.unlink()
    assert main(args) == 0
    first = out.read_text()
    assert first.startswith("forecast,variable")
    assert main([*args, "--overwrite"]) == 0 and out.read_text() == first

    def broken(_result):
        raise RuntimeError("disk full")

    monkeypatch.setattr("bdlens.evaluate.to_table", broken)
    target = tmp_path / "new.csv"
    with pytest.raises(RuntimeError, match="disk full"):
        write(xr.Dataset(), target)
    assert list(tmp_path.glob("*new.csv*")) == []


def test_without_out_prints_a_summary_and_help_works(stores, capsys):
    assert main(["-q", "evaluate", stores["forecast"], "--truth", stores["truth"], "--variables", "2m_temperature"]) == 0
    printed = capsys.readouterr().out
    assert "spread_skill_corrected" in printed and "surface" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "--scheduler" in capsys.readouterr().out
