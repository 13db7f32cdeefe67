"""Calibration of a whole system from analyses: the search finds the amplitude that calibrates the
ensemble, the system file it writes is what the engine then uses for every step model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from bdlens.checkpoint import BUNDLED_DIR
from bdlens.ensemble import Forecaster
from bdlens.training.calibration import EnsembleCalibrationConfig, calibrate_system, ensemble_scores, write_system_file


def test_scores_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    shape = (6, 2, 1, 4, 8)  # number, time, lead, lat, lon
    times = np.array(["2000-01-01T00", "2000-01-02T00"], dtype="datetime64[ns]")
    lead = np.array([24], dtype="timedelta64[h]").astype("timedelta64[ns]")
    lat, lon = np.linspace(-60, 60, 4), np.arange(8) * 45.0
    fc = xr.Dataset({"t": (("number", "time", "prediction_timedelta", "latitude", "longitude"), rng.normal(size=shape))},
                    coords={"time": times, "prediction_timedelta": lead, "latitude": lat, "longitude": lon})
    truth_times = np.array(["2000-01-02T00", "2000-01-03T00"], dtype="datetime64[ns]")
    truth = xr.Dataset({"t": (("time", "latitude", "longitude"), rng.normal(size=(2, 4, 8)))},
                       coords={"time": truth_times, "latitude": lat, "longitude": lon})
    out = ensemble_scores(fc, truth, {"t": 2.0}, ["t"])
    from bdlens.grid import lat_weights

    w = lat_weights(lat)[None, :, None]
    x, y = fc.t.values[:, :, 0] / 2.0, truth.t.values[None] / 2.0
    m = x.shape[0]
    fair = np.abs(x - y).mean(0) - np.abs(x[:, None] - x[None]).sum((0, 1)) / (2 * m * (m - 1))
    np.testing.assert_allclose(out["crps"], (fair * w).mean(), rtol=1e-6)
    ssr = np.sqrt((x.var(0, ddof=1) * w).mean() / ((x.mean(0) - y[0]) ** 2 * w).mean() * (m + 1) / m)
    np.testing.assert_allclose(out["spread_skill"], ssr, rtol=1e-6)


@pytest.mark.slow
def test_calibration_moves_the_ensemble_towards_calibration_and_the_engine_uses_it(small_world, tmp_path):
    truth = xr.open_zarr(small_world / "truth.zarr").load()
    analysis = xr.open_zarr(small_world / "analysis.zarr").load()
    config = EnsembleCalibrationConfig.model_validate({
        "members": 4, "weights": 2, "lead": "24h", "fields": ["geopotential:500", "temperature:850"],
        "amplitude": {"low": 0.2, "high": 5.0, "max_evaluations": 3, "xatol": 0.3}, "temperature": {"tune": False}})
    inits = analysis.time.values[[8]]
    forecaster = Forecaster.from_pretrained(device="cpu")
    record = calibrate_system(forecaster, "sppt", analysis, truth, inits, config)
    assert record["after"]["objective"] <= record["before"]["objective"]
    assert abs(np.log(record["after"]["spread_skill"])) <= abs(np.log(record["before"]["spread_skill"])) + 1e-9
    path = write_system_file(tmp_path, "sppt", record, {}, make_default=True)
    system = json.loads(Path(path).read_text())
    assert system["default_perturbation"] == "sppt" and system["schemes"]["sppt"]["amplitude"] == record["amplitude"]
    for bundle in BUNDLED_DIR.iterdir():  # the system = the bundled checkpoints + this calibration
        if (bundle / "manifest.json").is_file():
            (tmp_path / bundle.name).symlink_to(bundle)
    calibrated = Forecaster.from_pretrained(tmp_path, device="cpu")
    assert calibrated.default_perturbation() == "sppt"
    _, used = calibrated.source(calibrated_design(), "sppt", True, seed=0)
    assert used == {"temperature": record["temperature"], "amplitude": record["amplitude"]}


def calibrated_design():
    from bdlens.ensemble import Design

    return Design(2, 2)
