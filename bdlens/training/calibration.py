"""Calibrating a whole ensemble system from analyses (``bdlens calibrate-ensemble``; docs/science.md §5).

The amplitude a of a perturbation scheme and the posterior temperature T are tuned as a real
forecast is run: ensembles from the *analysis* at validation-period inits, through the ensemble
engine (so the calibration applies to every step model of the rollout, 24 h steps included),
verified against the *truth*. The objective and the search are those of
:func:`bdlens.perturbation.calibrate.calibrate`: J = CRPS · (1 + λ ln² SSR), with CRPS the fair
CRPS and SSR the corrected spread-skill ratio pooled over fields and leads, each field in units of
its own climatological standard deviation (the truth's, over the validation period), latitude-weighted.
The result is written to ``OUT/ensemble.json`` (the system file the engine reads); copy it beside
the checkpoints (e.g. into the bundle) to make it the system's calibration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr
from pydantic import Field

from bdlens.configs import YamlConfig
from bdlens.ensemble import Forecaster
from bdlens.metrics import crps
from bdlens.metrics.probabilistic import mean_variance_and_mse
from bdlens.perturbation.calibrate import AmplitudeSearch, TemperatureSearch, calibrate
from bdlens.progress import bar

DIMS = ("time", "latitude", "longitude")


class EnsembleCalibrationConfig(YamlConfig):
    """``configs/calibrate_ensemble_demo.yaml``: the forecasts calibrated on and the search."""

    what: ClassVar[str] = "ensemble calibration config"

    members: int = Field(default=16, ge=4)
    weights: int = Field(default=4, ge=2)
    inits: int = Field(default=8, gt=0, description="validation-period init times")
    every_days: int = Field(default=10, gt=0)
    lead: str = "5d"
    output_step: str = "24h"
    fields: tuple[str, ...] = ("geopotential:500", "temperature:850", "u_component_of_wind:850", "mean_sea_level_pressure")
    seed: int = 2024
    penalty: float = Field(default=1.0, ge=0)
    amplitude: AmplitudeSearch = AmplitudeSearch()
    temperature: TemperatureSearch = TemperatureSearch()


def _field(ds: xr.Dataset, spec: str) -> xr.DataArray:
    name, _, level = spec.partition(":")
    return ds[name].sel(level=int(level)) if level else ds[name]


def ensemble_scores(forecast: xr.Dataset, truth: xr.Dataset, scale: dict[str, float], fields: Sequence[str]) -> dict[str, Any]:
    """Fair CRPS (mean over fields and leads) and corrected SSR (pooled) in climatological-std units."""
    valid = truth.sel(time=forecast.time + forecast.prediction_timedelta).drop_vars("time").assign_coords(time=forecast.time.values)
    crps_values, variance, mse = [], 0.0, 0.0
    for spec in fields:
        fc, tr = _field(forecast, spec) / scale[spec], _field(valid, spec) / scale[spec]
        crps_values.append(float(crps(fc, tr, dims=DIMS).mean()))
        v, e = mean_variance_and_mse(fc, tr, "number", list(DIMS))
        variance, mse = variance + float(v.sum()), mse + float(e.sum())
    members = forecast.sizes["number"]
    return {"crps": float(np.mean(crps_values)), "spread_skill": math.sqrt(variance / mse * (members + 1) / members)}


def calibrate_system(
    forecaster: Forecaster, perturbation: str, analysis: xr.Dataset, truth: xr.Dataset, inits: Sequence[np.datetime64],
    config: EnsembleCalibrationConfig,
) -> dict[str, Any]:
    """Search (amplitude, temperature) for ``perturbation`` (see the module docstring); returns the record."""
    scale = {spec: float(_field(truth, spec).std()) for spec in config.fields}
    tune_amplitude = perturbation != "none"
    temperatures = len(config.temperature.values) if config.temperature.tune else 1
    expected = 1 + temperatures * (config.amplitude.max_evaluations if tune_amplitude else 1)
    with bar(total=expected, desc=f"calibrate ({perturbation})", unit="eval") as progress:

        def evaluate(a: float, t: float) -> dict[str, Any]:
            forecast = forecaster.ensemble(
                init=[str(i) for i in inits], members=config.members, weights=config.weights, lead=config.lead,
                output_step=config.output_step, perturbation=perturbation, seed=config.seed, data=analysis,
                temperature=t, amplitude=a if tune_amplitude else None,
            )
            progress.update(1)
            return ensemble_scores(forecast, truth, scale, config.fields)

        result = calibrate(evaluate, config, tune_amplitude=tune_amplitude)
    return {
        "amplitude": result["amplitude"], "temperature": result["temperature"],
        "objective": f"J = CRPS_fair * (1 + {config.penalty} * ln(SSR_corrected)^2); fields {list(config.fields)} in units of their "
                     f"climatological std, latitude-weighted, leads to {config.lead} every {config.output_step}, "
                     f"{config.members} members (K = {config.weights}), {len(inits)} validation inits from the analysis vs the truth",
        "before": result["before"], "after": result["after"], "history": result["history"],
    }


def write_system_file(out: Path, perturbation: str, record: dict[str, Any], base: dict[str, Any], make_default: bool) -> Path:
    """``out/ensemble.json``: ``base`` (the system's current file) with this scheme's calibration."""
    system = dict(base)
    schemes = dict(system.get("schemes", {}))
    schemes[perturbation] = {**schemes.get(perturbation, {}), "amplitude": record["amplitude"],
                             "temperature": record["temperature"], "calibration": {k: v for k, v in record.items() if k != "history"}}
    system["schemes"] = schemes
    if make_default:
        system["default_perturbation"] = perturbation
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ensemble.json"
    path.write_text(json.dumps(system, indent=1, default=float))
    return path
