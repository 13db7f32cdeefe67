"""The metric registry: one entry per metric, read by the evaluation engine (and so by the CLI and the report)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest
import xarray as xr
from synthetic import synthetic_dataset, synthetic_forecast

from bdlens import grid
from bdlens.errors import BdlensError
from bdlens.evaluate import evaluate
from bdlens.metrics import registry
from bdlens.uncertainty import calibration_check


def _inputs() -> tuple[xr.Dataset, xr.Dataset]:
    truth = synthetic_dataset(times=6, upper_variables=(), surface_variables=("2m_temperature",))
    return synthetic_forecast(truth, n_inits=3, lead_hours=(6, 12), weight_samples=2, draws=2), truth


def test_every_entry_states_its_formula_and_description():
    for metric in registry.METRICS.values():
        assert metric.formula and metric.description and metric.kind in ("score", "diagnostic", "check")
        assert any(sym in metric.formula for sym in ("=", "/", "−", "²", "|")), metric.name
    assert registry.description("brier_q0.9").startswith("Brier score") and "q0.9" in registry.description("brier_q0.9")
    with pytest.raises(BdlensError, match="unknown metric"):
        registry.select(["no_such_metric"])


def test_adding_a_metric_is_one_entry(monkeypatch):
    def mae(x: registry.Inputs) -> xr.DataArray:
        """mean |x̄ − y| over init time and area."""
        error = abs(x.forecast.mean(x.member_dim) - x.truth)
        return error.weighted(grid_weights(x.truth)).mean(x.dims)

    def grid_weights(truth: xr.DataArray) -> xr.DataArray:
        return xr.DataArray(grid.lat_weights(truth.latitude.values), dims="latitude", coords={"latitude": truth.latitude})

    extended = {**registry.METRICS, "mae": registry.Metric("mae", mae, "mean absolute error of the ensemble mean", min_members=1)}
    monkeypatch.setattr(registry, "METRICS", MappingProxyType(extended))
    forecast, truth = _inputs()
    result = evaluate({"f": forecast}, truth)["2m_temperature"]
    assert "mae" in result.metric.values.tolist()
    assert result.metric_description.sel(metric="mae").item() == "mean absolute error of the ensemble mean"
    lead = forecast.prediction_timedelta.values[0]
    fc = forecast["2m_temperature"].sel(prediction_timedelta=lead).mean("number").values
    obs = truth["2m_temperature"].sel(time=forecast.time.values + lead).values
    w = grid.lat_weights(truth.latitude.values)[:, None]
    expected = (np.abs(fc - obs) * w).sum() / (w.sum() * fc.shape[0] * fc.shape[2])
    np.testing.assert_allclose(result.sel(forecast="f", metric="mae", prediction_timedelta=lead).item(), expected, rtol=1e-6)


def test_checks_on_request_and_deterministic_scoring():
    forecast, truth = _inputs()
    result = evaluate({"f": forecast}, truth, metrics=["calibration", "total_variance", "rmse"])
    assert set(result["2m_temperature"].metric.values.tolist()) == {"rmse"}
    lead = forecast.prediction_timedelta.values[1]
    aligned = truth["2m_temperature"].sel(time=forecast.time.values + lead).assign_coords(time=forecast.time.values)
    direct = calibration_check(forecast["2m_temperature"].sel(prediction_timedelta=lead), aligned)
    np.testing.assert_allclose(result["2m_temperature_calibration_ratio"].sel(forecast="f", prediction_timedelta=lead), direct["ratio"], rtol=1e-10)
    assert float(result["2m_temperature_total_variance_relative_residual"].max()) < 1e-6

    single = forecast.isel(number=0, drop=True)
    with pytest.raises(BdlensError, match="no member dimension"):
        evaluate({"det": single}, truth)
    scores = evaluate({"det": single, "ens": forecast}, truth, deterministic=True)["2m_temperature"]
    det = scores.sel(forecast="det", prediction_timedelta=lead)
    obs = aligned.values
    fc = single["2m_temperature"].sel(prediction_timedelta=lead).values
    w = grid.lat_weights(truth.latitude.values)[:, None]
    area = lambda x: ((x * w).sum(axis=(1, 2)) / (w.sum() * x.shape[2])).mean()  # noqa: E731
    np.testing.assert_allclose(det.sel(metric="crps_standard"), area(np.abs(fc - obs)), rtol=1e-6)  # the CRPS of one member is its MAE
    np.testing.assert_allclose(det.sel(metric="rmse"), np.sqrt(area((fc - obs) ** 2)), rtol=1e-6)
    assert np.isnan(det.sel(metric="crps")) and np.isnan(det.sel(metric="spread"))
    assert scores.sel(forecast="ens", metric="epistemic_variance").notnull().all()
