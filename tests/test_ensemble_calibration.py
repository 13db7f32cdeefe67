"""Calibration of a whole system from analyses: the search finds the amplitude that calibrates the
ensemble, the system file it writes is what the engine then uses for every step model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from bdlens.checkpoint import BUNDLED_DIR
from bdlens.cli import main
from bdlens.ensemble import Design, Forecaster
from bdlens.ensemble.system import KINDS, WITHOUT_POSTERIOR, System
from bdlens.errors import BdlensError
from bdlens.training.calibration import (
    EnsembleCalibrationConfig,
    PerLeadSearch,
    calibrate,
    calibrate_lead_factors,
    calibrate_system,
    ensemble_scores,
    field_scales,
    objective,
    write_system_file,
)
from bdlens.training.ensemble_validation import fair_crps


def toy(true_spread: float, base_spread: float = 1.0, n: int = 20000, k: int = 8):
    """evaluate(a, T) for members m + a·T·base_spread·ε against truth m + true_spread·η (fixed draws)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    truth = mean + true_spread * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(k, n, generator=g, dtype=torch.float64)

    def evaluate(a: float, t: float) -> dict:
        ens = mean + a * t * base_spread * eps
        variance, mse = ens.var(0, correction=1).mean(), (ens.mean(0) - truth).square().mean()
        return {"crps": float(fair_crps(ens, truth).mean()), "spread_skill": math.sqrt(variance / mse * (k + 1) / k)}

    return evaluate


@pytest.mark.parametrize("true_spread", [0.3, 2.0])
def test_calibration_recovers_a_known_spread(true_spread: float) -> None:
    config = EnsembleCalibrationConfig(amplitude={"low": 0.05, "high": 10.0, "xatol": 0.005})
    result = calibrate(toy(true_spread), config)
    assert result["amplitude"] == pytest.approx(true_spread, rel=0.04)
    assert result["temperature"] == 1.0 and result["after"]["spread_skill"] == pytest.approx(1.0, abs=0.04)
    assert result["after"]["crps"] < result["before"]["crps"]
    assert result["after"]["objective"] == objective(result["after"]["crps"], result["after"]["spread_skill"], 1.0)
    assert len(result["history"]) <= 1 + config.amplitude.max_evaluations


def test_temperature_only_calibration_picks_the_grid_value_that_fits() -> None:
    config = EnsembleCalibrationConfig(temperature={"tune": True, "values": [1.0, 2.0, 4.0, 8.0]})
    result = calibrate(toy(2.0, base_spread=0.5), config, tune_amplitude=False)  # spread 0.5·T: T = 4 fits
    assert (result["amplitude"], result["temperature"]) == (1.0, 4.0)
    assert [r["temperature"] for r in result["history"]] == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(BdlensError, match="nothing to calibrate"):
        calibrate(toy(1.0), EnsembleCalibrationConfig(), tune_amplitude=False)


def toy_rollout(base: list[float], error: list[float], n: int = 20000, k: int = 8):
    """evaluate(factors) for a rollout whose member spread at lead L is sqrt(Σ_{l ≤ L} (f_l·base_l)²)
    (independent perturbations accumulate) and whose truth is error_L from the members' centre
    (plus the finite ensemble's sampling error, which the corrected SSR accounts for)."""
    g = torch.Generator().manual_seed(1)
    leads = len(base)
    mean = torch.randn(leads, n, generator=g, dtype=torch.float64)
    truth = mean + torch.tensor(error, dtype=torch.float64)[:, None] * torch.randn(leads, n, generator=g, dtype=torch.float64)
    eps = torch.randn(k, leads, n, generator=g, dtype=torch.float64)

    def evaluate(factors: dict) -> dict:
        f = torch.tensor([factors[h] for h in sorted(factors)], dtype=torch.float64)
        spread = torch.sqrt(torch.cumsum((f * torch.tensor(base, dtype=torch.float64)) ** 2, 0))
        ens = mean + spread[:, None] * eps
        crps_l = [float(fair_crps(ens[:, i], truth[i]).mean()) for i in range(leads)]
        ssr_l = [math.sqrt(float(ens[:, i].var(0, correction=1).mean() / (ens[:, i].mean(0) - truth[i]).square().mean()) * (k + 1) / k)
                 for i in range(leads)]
        return {"crps_by_lead": crps_l, "spread_skill_by_lead": ssr_l}

    return evaluate


def test_per_lead_factors_converge_to_the_exact_solution_of_a_toy_rollout() -> None:
    # Spread made at every step accumulates; the exact factors give Σ_{l<=L} (f_l b_l)² = e_L² at every L.
    base, error = [1.0, 1.0, 1.0, 1.0], [0.8, 1.5, 1.8, 1.9]
    exact = [math.sqrt(error[0] ** 2) / base[0]] + [math.sqrt(error[i] ** 2 - error[i - 1] ** 2) / base[i] for i in range(1, 4)]
    result = calibrate_lead_factors(toy_rollout(base, error), [24, 48, 72, 96], PerLeadSearch(tune=True, iterations=12), 1.0)
    np.testing.assert_allclose([result["lead_factors"][h] for h in (24, 48, 72, 96)], exact, rtol=0.08)
    np.testing.assert_allclose(result["after"]["spread_skill_by_lead"], 1.0, atol=0.03)
    assert result["after"]["objective"] < result["before"]["objective"]
    assert result["before"]["lead_factors"] == {24: 1.0, 48: 1.0, 72: 1.0, 96: 1.0} and len(result["history"]) == 13


def test_per_lead_factors_stay_at_one_for_a_calibrated_rollout() -> None:
    result = calibrate_lead_factors(toy_rollout([1.0, 1.0], [1.0, math.sqrt(2.0)]), [24, 48], PerLeadSearch(tune=True), 1.0)
    np.testing.assert_allclose(list(result["lead_factors"].values()), 1.0, atol=0.05)


def test_per_lead_factors_capped_at_one_only_damp_the_over_dispersed_leads() -> None:
    # Under-dispersed to 2 steps (spread 1, √2 < error 1.5), over-dispersed after (√3 > 1.6, 2 > 1.7): with high = 1
    # the first two factors stay 1 and the others take the exact values that give spread = error there.
    base, error = [1.0, 1.0, 1.0, 1.0], [1.5, 1.5, 1.6, 1.7]
    exact = [1.0, 1.0, math.sqrt(error[2] ** 2 - 2.0), math.sqrt(error[3] ** 2 - error[2] ** 2)]
    search = PerLeadSearch(tune=True, iterations=12, high=1.0)
    result = calibrate_lead_factors(toy_rollout(base, error), [24, 48, 72, 96], search, 1.0)
    factors = [result["lead_factors"][h] for h in (24, 48, 72, 96)]
    assert factors[:2] == [1.0, 1.0]
    np.testing.assert_allclose(factors[2:], exact[2:], rtol=0.08)
    np.testing.assert_allclose(result["after"]["spread_skill_by_lead"][2:], 1.0, atol=0.03)


def test_calibrate_no_bayes_without_a_scheme_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "cal"
    assert main(["-q", "calibrate", "--perturbation", "none", "--no-bayes", "--out", str(out), "--world", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to calibrate" in err and not out.exists()


def test_calibrate_refuses_to_replace_a_system_file(tmp_path, capsys):
    (tmp_path / "ensemble.json").write_text("{}")
    assert main(["-q", "calibrate", "--perturbation", "sppt", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and (tmp_path / "ensemble.json").read_text() == "{}"


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
    np.testing.assert_allclose(out["spread_skill_by_field"]["t"], [ssr], rtol=1e-6)  # one field, one lead: the pooled one


def test_field_scales_are_the_anomaly_std_not_the_std_of_the_mean_pattern():
    """A field = a fixed equator-to-pole pattern (std 10 over the grid) + anomalies whose std is 1 at
    latitude ±60° and 3 at ±20°: the scale is sqrt(area-weighted mean of the variance in time), which
    the mean pattern does not change, against about 10 for the std over space and time together."""
    from bdlens.grid import lat_weights

    rng = np.random.default_rng(3)
    lat, lon = np.array([-60.0, -20.0, 20.0, 60.0]), np.arange(8) * 45.0
    pattern = 10 * np.array([-1.5, -0.5, 0.5, 1.5])[:, None] / np.sqrt(1.25) * np.ones(8)
    local = np.array([1.0, 3.0, 3.0, 1.0])[:, None]
    anomalies = rng.normal(size=(4000, 4, 8))
    anomalies = (anomalies - anomalies.mean(0)) / anomalies.std(0) * local  # exactly the local (population) std in time
    truth = xr.Dataset({"t": (("time", "latitude", "longitude"), pattern + anomalies),
                        "u": (("time", "latitude", "longitude"), anomalies)}, coords={"latitude": lat, "longitude": lon})
    w = lat_weights(lat)
    expected = math.sqrt((w * np.array([1.0, 9.0, 9.0, 1.0])).sum() / w.sum())
    scales = field_scales(truth, ["t", "u"])
    assert scales["t"] == pytest.approx(expected, rel=1e-9) and scales["u"] == pytest.approx(expected, rel=1e-9)
    assert float(truth.t.std()) > 3 * scales["t"]


class _StubSystem:
    def scheme(self, name: str, bayes: bool = True) -> dict:
        return {"amplitude": 1.7, "temperature": 1.5}


class _StubForecaster:
    """Members truth + error(L) + a·f(L)·ε with spread made at every 24 h step accumulating, as in ``toy_rollout``
    (ensemble-mean error 0.9, 1.2, 1.3 at 1, 2, 3 d; spread 1, √2, √3 at the system's amplitude 1.7): over-dispersed."""

    system = _StubSystem()

    def __init__(self, truth: xr.Dataset) -> None:
        self.truth, self.calls = truth, []

    def ensemble(self, init, members, lead, amplitude, temperature, lead_factors, **rest) -> xr.Dataset:
        self.calls.append((amplitude, temperature, dict(lead_factors)))
        hours = list(range(24, int(lead.removesuffix("d")) * 24 + 1, 24))
        times = np.array(init, dtype="datetime64[ns]")
        steps = np.array([amplitude * lead_factors.get(h, 1.0) / 1.7 for h in hours])
        spread = np.sqrt(np.cumsum(steps ** 2))
        g = np.random.default_rng(0)
        shape = (len(times), len(hours), 4, 8)
        when = xr.DataArray(times[:, None] + np.array(hours, "timedelta64[h]")[None], dims=("init", "lead"))
        valid = self.truth.t.sel(time=when).values
        centre = valid + np.array([0.9, 1.2, 1.3])[None, : len(hours), None, None] * g.normal(size=shape)
        x = centre[None] + spread[None, None, :, None, None] * g.normal(size=(members, *shape))
        return xr.Dataset({"t": (("number", "time", "prediction_timedelta", "latitude", "longitude"), x)},
                          coords={"time": times, "prediction_timedelta": np.array(hours, "timedelta64[h]").astype("timedelta64[ns]"),
                                  "latitude": self.truth.latitude.values, "longitude": self.truth.longitude.values})


def test_per_lead_factors_on_the_system_amplitude_keep_it_and_only_damp(tmp_path) -> None:
    times = np.arange(np.datetime64("2000-01-01"), np.datetime64("2000-03-01"), np.timedelta64(1, "D")).astype("datetime64[ns]")
    lat, lon = np.linspace(-60, 60, 4), np.arange(8) * 45.0
    truth = xr.Dataset({"t": (("time", "latitude", "longitude"), np.random.default_rng(1).normal(size=(len(times), 4, 8)))},
                       coords={"time": times, "latitude": lat, "longitude": lon})
    config = EnsembleCalibrationConfig.model_validate({
        "members": 32, "weights": 2, "lead": "2d", "fields": ["t"], "amplitude": {"tune": False}, "temperature": {"tune": False},
        "per_lead": {"tune": True, "lead": "3d", "iterations": 10, "high": 1.0}})
    stub = _StubForecaster(truth)
    record = calibrate_system(stub, "sppt", truth, truth, times[:20], config)
    assert (record["amplitude"], record["temperature"]) == (1.7, 1.5)
    assert all(call[:2] == (1.7, 1.5) for call in stub.calls) and len(stub.calls) == 1 + 11
    factors = [record["lead_factors"][h] for h in (24, 48, 72)]
    # the exact factors make the spread equal the error at every lead: Σ_{l ≤ L} f_l² = e_L² (the last, 0.5, adds
    # little spread to what the earlier steps made, so sampling leaves it loosely determined)
    np.testing.assert_allclose(factors[:2], [0.9, math.sqrt(1.2**2 - 0.9**2)], rtol=0.1)
    assert max(factors) <= 1.0 and factors[2] < factors[1]
    np.testing.assert_allclose(record["per_lead"]["after"]["spread_skill_by_lead"], 1.0, atol=0.06)
    assert record["per_lead"]["after"]["objective"] < record["per_lead"]["before"]["objective"]
    with pytest.raises(ValueError, match="temperature.tune: false too"):
        EnsembleCalibrationConfig.model_validate({"amplitude": {"tune": False}, "temperature": {"tune": True}})
    # the search that found (a, T) stays in the system file beside the per-lead record made on it
    earlier = {"amplitude": 1.7, "temperature": 1.5, "config": "sppt_variant", "calibration": {"searched": "a, T"}}
    scheme = json.loads(write_system_file(tmp_path / "lead", "sppt", record, {"schemes": {"sppt": earlier}}, False).read_text())["schemes"]["sppt"]
    assert scheme["calibration"] == {"searched": "a, T"} and scheme["config"] == "sppt_variant"
    assert scheme["lead_calibration"]["per_lead"]["after"]["crps_by_lead"] == record["per_lead"]["after"]["crps_by_lead"] and "amplitude_kept" not in scheme["lead_calibration"]
    assert [scheme["lead_factors"][str(h)] for h in (24, 48, 72)] == factors
    # a new (a, T) search replaces both: neither the factors nor their record belong to it
    searched = {**{k: record[k] for k in ("before", "after", "objective")}, "amplitude": 2.0, "temperature": 1.0, "amplitude_kept": False}
    scheme = json.loads(write_system_file(tmp_path / "new", "sppt", searched, {"schemes": {"sppt": scheme}}, False).read_text())["schemes"]["sppt"]
    assert "lead_factors" not in scheme and "lead_calibration" not in scheme and scheme["calibration"]["after"] == record["after"]
    assert "search" not in scheme["calibration"]  # a record without its history has no trail to keep
    # the (a, T) trail is kept in evaluation order, its pooled scores only; its best entry is `after`
    history = [{"amplitude": a, "temperature": t, "crps": 0.5 + abs(a - 2.0), "spread_skill": 1.0, "objective": 0.5 + abs(a - 2.0),
                "crps_by_lead": [0.1, 0.2]} for a, t in ((1.0, 1.0), (3.0, 1.0), (2.0, 0.5))]
    scheme = json.loads(write_system_file(tmp_path / "trail", "sppt", {**searched, "history": history}, {}, False).read_text())["schemes"]["sppt"]
    assert [(e["amplitude"], e["temperature"]) for e in scheme["calibration"]["search"]] == [(1.0, 1.0), (3.0, 1.0), (2.0, 0.5)]
    assert all(set(e) == {"amplitude", "temperature", "crps", "spread_skill", "objective"} for e in scheme["calibration"]["search"])
    assert "search" not in scheme.get("lead_calibration", {})


def test_a_calibration_on_the_deterministic_weights_is_kept_apart_and_read_by_them_only(tmp_path) -> None:
    times = np.arange(np.datetime64("2000-01-01"), np.datetime64("2000-03-01"), np.timedelta64(1, "D")).astype("datetime64[ns]")
    truth = xr.Dataset({"t": (("time", "latitude", "longitude"), np.random.default_rng(1).normal(size=(len(times), 4, 8)))},
                       coords={"time": times, "latitude": np.linspace(-60, 60, 4), "longitude": np.arange(8) * 45.0})
    config = EnsembleCalibrationConfig.model_validate({"members": 32, "weights": 2, "lead": "2d", "fields": ["t"],
                                                      "amplitude": {"max_evaluations": 4}, "temperature": {"tune": True, "values": [1, 2]}})

    class Recording(_StubForecaster):
        def ensemble(self, **options):
            self.options = getattr(self, "options", []) + [{k: options[k] for k in ("bayes", "weights")}]
            return super().ensemble(**options)

    stub = Recording(truth)
    record = calibrate_system(stub, "sppt", truth, truth, times[:20], config, bayes=False)
    # no posterior: no weight count, no temperature to search
    assert all(o == {"bayes": False, "weights": None} for o in stub.options) and {c[1] for c in stub.calls} == {1.0}
    assert "deterministic weights" in record["objective"]
    hybrid = {"amplitude": 1.2, "temperature": 1.0, "config": "sppt_variant", "lead_factors": {"24": 0.5}, "calibration": {"with": "posterior"}}
    path = write_system_file(tmp_path / "cal", "sppt", record, {"schemes": {"sppt": hybrid}}, False, bayes=False)
    entry = json.loads(path.read_text())["schemes"]["sppt"]
    assert {k: v for k, v in entry.items() if k != WITHOUT_POSTERIOR} == hybrid  # the posterior's calibration is untouched
    assert entry[WITHOUT_POSTERIOR]["amplitude"] == record["amplitude"] and "lead_factors" not in entry[WITHOUT_POSTERIOR]
    system = System(tmp_path, {kind: {} for kind in KINDS}, json.loads(path.read_text()))
    assert system.scheme("sppt", bayes=True) == hybrid
    alone = system.scheme("sppt", bayes=False)
    # the deterministic weights' own entries override; what it does not set (the SPPT config, the factors) it shares
    assert alone["amplitude"] == record["amplitude"] and alone["calibration"]["after"] == record["after"]
    assert alone["config"] == "sppt_variant" and alone["lead_factors"] == {"24": 0.5} and WITHOUT_POSTERIOR not in alone


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
    # a calibration of its own for the deterministic weights is what they read, and only they
    path = write_system_file(tmp_path, "sppt", {**record, "amplitude": 3.0}, system, make_default=True, bayes=False)
    calibrated = Forecaster.from_pretrained(tmp_path, device="cpu")
    assert calibrated.source(calibrated_design(), "sppt", True, seed=0)[1]["amplitude"] == record["amplitude"]
    assert calibrated.source(Design(1, 4), "sppt", False, seed=0)[1]["amplitude"] == 3.0


def calibrated_design():
    from bdlens.ensemble import Design

    return Design(2, 2)


def test_validation_inits_leave_a_day_of_history_and_the_longest_scored_lead() -> None:
    from bdlens.errors import BdlensError
    from bdlens.training.calibration import validation_inits

    times = np.arange(np.datetime64("2001-01-01T00"), np.datetime64("2001-04-01T00"), np.timedelta64(6, "h")).astype("datetime64[ns]")
    truth = xr.Dataset(coords={"time": times})
    bounds = (np.datetime64("2001-01-01T00"), np.datetime64("2001-03-01T00"))
    config = EnsembleCalibrationConfig.model_validate({"inits": 8, "every_days": 10, "lead": "5d"})
    got = validation_inits(truth, config, bounds)
    # brute force: 00 UTC days from Jan 2 every 10 days whose init + 5 d is still inside the period
    expected = [np.datetime64("2001-01-02T00") + np.timedelta64(10 * i, "D") for i in range(8)]
    expected = [t for t in expected if t + np.timedelta64(5, "D") <= bounds[1]]
    assert list(got.astype("datetime64[h]")) == [t.astype("datetime64[h]") for t in expected] and len(expected) == 6
    longer = config.model_copy(update={"per_lead": config.per_lead.model_copy(update={"tune": True, "lead": "10d"})})
    assert list(validation_inits(truth, longer, bounds)) == list(got[:5])  # the per-lead lead is the longest scored
    with pytest.raises(BdlensError, match="no init with 60d of truth after it"):
        validation_inits(truth, config.model_copy(update={"lead": "60d"}), bounds)
