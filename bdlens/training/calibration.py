"""Calibrating a whole ensemble system from analyses (``bdlens calibrate``; docs/science.md §5).

Two knobs scale an ensemble's spread at forecast time: the **amplitude** a of a perturbation scheme
(a multiplier on its spread: the learned network's σ, every SPPT pattern scale's σ, the IC field's
std) and the **posterior temperature** T (θ_k = μ + T·σ_q ε_k). They are tuned as a real forecast is
run: ensembles from the *analysis* at validation-period inits, through the ensemble engine (so the
calibration applies to every step model of the rollout, 24 h steps included), verified against the
*truth*.

**Objective.** J(a, T) = CRPS(a, T) · (1 + λ · ln² SSR(a, T)), with CRPS the fair CRPS and SSR the
corrected spread-skill ratio pooled over fields and leads, each field in units of its own
climatological anomaly standard deviation (:func:`field_scales`), latitude-weighted. The
fair CRPS is proper, so for a well-specified model its minimum is the calibrated spread, where SSR ≈ 1
as well; the penalty (λ = ``penalty``, 0 for pure CRPS) breaks ties toward SSR = 1 when bias or a
misspecified spatial structure pulls the two apart, and treats an SSR of ½ and of 2 as equally bad.
Every evaluation uses the same seeds (common random numbers), so J is a smooth function of a and T.

**Search.** a: bounded Brent search (:func:`scipy.optimize.minimize_scalar`) over ln a in
[ln low, ln high]; T (when tuned): each value of a small grid, with the search over a inside. The best
(a, T) by J is kept; the record has J, CRPS and SSR before (a = T = 1) and after.
:func:`calibrate` takes any ``evaluate(a, T) → {"crps", "spread_skill"}``, so it is tested on a toy
problem with a known spread.

**Per lead** (``per_lead.tune``). A fixed amplitude can leave the spread-skill ratio drifting with
lead (spread made at every step accumulates at its own rate, the error at another). With (a, T)
fixed, factors f(L) on the amplitude of the call ending at lead L (every ``output_step`` to
``per_lead.lead``) are found by the fixed-point iteration f(L) ← f(L) · SSR(L)^(−η), η =
``per_lead.damping``: a step whose lead is over-dispersed gets weaker perturbations. The spread at
L also holds what earlier steps made, so the update is repeated ``per_lead.iterations`` times from
f = 1; the iterate with the lowest lead-mean objective J̄ = mean_L CRPS(L) (1 + λ ln² SSR(L)) is
kept (f = 1 when none beats it). ``per_lead.high: 1`` lets the factors only damp the calibrated
amplitude, and ``amplitude.tune: false`` keeps the system's (a, T) and finds only the factors.
Hand-written because the update needs the per-lead scores, which no optimiser's interface gives it;
it is tested on a toy rollout whose exact solution is known.

The result is written to ``OUT/ensemble.json`` (the system file the engine reads); copy it beside
the checkpoints (e.g. into the bundle) to make it the system's calibration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize_scalar

from bdlens.configs import YamlConfig
from bdlens.data.splits import period_inits
from bdlens.ensemble import Forecaster
from bdlens.ensemble.engine import parse_hours
from bdlens.ensemble.system import SYSTEM_FILE, WITHOUT_POSTERIOR
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.metrics import crps
from bdlens.metrics.probabilistic import mean_variance_and_mse
from bdlens.outputs import mark_output
from bdlens.progress import bar

DIMS = ("time", "latitude", "longitude")
#: the kind of ``bdlens calibrate --out`` (a directory holding ``ensemble.json``)
CALIBRATION_KIND = "ensemble calibration"
#: what the system file keeps of each (a, T) evaluation of the search (its ``search`` list)
SEARCH_KEYS = ("amplitude", "temperature", "crps", "spread_skill", "objective")
Evaluate = Callable[[float, float], dict[str, Any]]


class AmplitudeSearch(BaseModel):
    """Bounds and tolerance of the amplitude search (on ln a)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tune: bool = Field(default=True, description="false: keep the system's calibrated amplitude and temperature (e.g. to add per-lead factors)")
    low: float = Field(default=0.1, gt=0)
    high: float = Field(default=5.0, gt=0)
    xatol: float = Field(default=0.02, gt=0, description="absolute tolerance on ln a (0.02: 2 %)")
    max_evaluations: int = Field(default=20, ge=3)

    @model_validator(mode="after")
    def _ordered(self) -> AmplitudeSearch:
        if not self.low < 1.0 < self.high:
            raise ValueError(f"need low < 1 < high so that the uncalibrated amplitude is inside, got [{self.low}, {self.high}]")
        return self


class TemperatureSearch(BaseModel):
    """Whether to tune the posterior temperature, and the values tried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tune: bool = False
    values: tuple[float, ...] = (1.0, 2.0, 4.0)

    @model_validator(mode="after")
    def _positive(self) -> TemperatureSearch:
        if not self.values or min(self.values) <= 0:
            raise ValueError("temperature values must be a non-empty list of positive numbers")
        return self




class PerLeadSearch(BaseModel):
    """Whether to calibrate per-lead factors on the amplitude, to which lead, and the iteration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tune: bool = False
    lead: str = "10d"
    iterations: int = Field(default=4, ge=1)
    # η > 1 is allowed because f(L) scales only the last step's perturbation while SSR(L) also holds
    # the spread of all earlier steps: measured on the demo hybrid, d ln SSR(10 d) / d ln f ≈ 0.2, so
    # η = 1 moves the late factors a fifth of the way per iteration.
    damping: float = Field(default=1.0, gt=0, le=5, description="η of f ← f · SSR^(−η)")
    low: float = Field(default=0.05, gt=0, description="smallest factor")
    high: float = Field(default=5.0, ge=1, description="largest factor (1: factors only damp the calibrated amplitude)")


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
    per_lead: PerLeadSearch = PerLeadSearch()

    @model_validator(mode="after")
    def _fixed_together(self) -> EnsembleCalibrationConfig:
        if not self.amplitude.tune and self.temperature.tune:
            raise ValueError("amplitude.tune: false keeps the system's amplitude and temperature; set temperature.tune: false too")
        return self


def objective(crps: float, spread_skill: float, penalty: float) -> float:
    """J = CRPS · (1 + λ ln² SSR) (see the module docstring)."""
    return crps * (1.0 + penalty * math.log(spread_skill) ** 2)


def lead_objective(crps_by_lead: Sequence[float], spread_skill_by_lead: Sequence[float], penalty: float) -> float:
    """J̄ = mean over leads of CRPS(L) · (1 + λ ln² SSR(L))."""
    return float(np.mean([objective(c, r, penalty) for c, r in zip(crps_by_lead, spread_skill_by_lead, strict=True)]))


def calibrate_lead_factors(
    evaluate: Callable[[dict[int, float]], dict[str, Any]], leads: Sequence[int], search: PerLeadSearch, penalty: float,
) -> dict[str, Any]:
    """Per-lead factors by the fixed-point iteration of the module docstring.

    ``evaluate(factors)`` (lead hours → factor) returns at least ``crps_by_lead`` and
    ``spread_skill_by_lead`` (one value per lead of ``leads``). Returns {"lead_factors", "before",
    "after", "history"}: the kept factors, the evaluations at f = 1 and at them (with ``objective``),
    and every iterate.
    """
    factors = {int(h): 1.0 for h in leads}
    history: list[dict[str, Any]] = []
    for iteration in range(search.iterations + 1):
        result = dict(evaluate(dict(factors)))
        result["objective"] = lead_objective(result["crps_by_lead"], result["spread_skill_by_lead"], penalty)
        history.append({"lead_factors": dict(factors), **result})
        if iteration == search.iterations:
            break
        factors = {h: float(np.clip(f * ssr ** -search.damping, search.low, search.high))
                   for (h, f), ssr in zip(factors.items(), result["spread_skill_by_lead"], strict=True)}
    best = min(history, key=lambda r: r["objective"])
    return {"lead_factors": best["lead_factors"], "before": history[0], "after": best, "history": history}


def calibrate(evaluate: Evaluate, config: EnsembleCalibrationConfig, tune_amplitude: bool = True,
              fixed: tuple[float, float] | None = None) -> dict[str, Any]:
    """Search (a, T) minimising J; ``evaluate(a, T)`` returns at least ``crps`` and ``spread_skill``.

    Returns {"amplitude", "temperature", "before", "after", "history"}: ``before``/``after`` are the
    evaluations at (1, 1) and at the optimum (with ``objective`` added), ``history`` every evaluation.
    With ``fixed`` = (a, T) nothing is searched: (a, T) is scored once and is both ``before`` and ``after``.
    """
    temperatures = config.temperature.values if config.temperature.tune else (1.0,)
    if fixed is None and not tune_amplitude and len(temperatures) == 1:
        raise BdlensError("nothing to calibrate: give a perturbation (learned or SPPT) or enable temperature tuning")
    search = config.amplitude
    cache: dict[tuple[float, float], dict[str, Any]] = {}

    def score(a: float, t: float) -> dict[str, Any]:
        key = (float(a), float(t))
        if key not in cache:
            result = dict(evaluate(*key))
            result["objective"] = objective(result["crps"], result["spread_skill"], config.penalty)
            cache[key] = {"amplitude": key[0], "temperature": key[1], **result}
        return cache[key]

    if fixed is not None:
        kept = score(*fixed)
        return {"amplitude": kept["amplitude"], "temperature": kept["temperature"], "before": kept, "after": kept, "history": [kept]}
    score(1.0, 1.0)
    for t in temperatures:
        if tune_amplitude:
            minimize_scalar(
                lambda log_a, t=t: score(math.exp(log_a), t)["objective"],
                bounds=(math.log(search.low), math.log(search.high)),
                method="bounded",
                options={"xatol": search.xatol, "maxiter": search.max_evaluations},
            )
        else:
            score(1.0, t)
    best = min(cache.values(), key=lambda r: r["objective"])
    return {"amplitude": best["amplitude"], "temperature": best["temperature"], "before": cache[(1.0, 1.0)], "after": best,
            "history": list(cache.values())}


def _field(ds: xr.Dataset, spec: str) -> xr.DataArray:
    name, _, level = spec.partition(":")
    return ds[name].sel(level=int(level)) if level else ds[name]


def field_scales(truth: xr.Dataset, fields: Sequence[str]) -> dict[str, float]:
    """Each field's climatological anomaly std (its units), the unit the scores are in: the root of the
    latitude-weighted mean over grid points of the truth's variance in time, the field's variability
    about its own mean at each point.

    Not the std over space and time together: that also holds the spatial pattern of the mean (the
    equator-to-pole contrast), which no forecast is scored for. On the demo world it is 3.4× (Z500),
    4.2× (T850), 1.06× (U850) and 1.25× (MSLP) the anomaly std, so pooled scores in those units
    weighed T850's errors 18× less than U850's and the calibration followed U850 and MSLP alone.
    The demo world has no seasons, so the time mean is its climatology (docs/science.md §5).
    """
    weights = xr.DataArray(lat_weights(truth.latitude.values), dims="latitude")
    return {spec: float(np.sqrt(_field(truth, spec).var("time").weighted(weights).mean(("latitude", "longitude"))))
            for spec in fields}


def ensemble_scores(forecast: xr.Dataset, truth: xr.Dataset, scale: dict[str, float], fields: Sequence[str]) -> dict[str, Any]:
    """Fair CRPS (mean over fields and leads) and corrected SSR (pooled) in units of ``scale``, both
    per lead (``crps_by_lead``: mean over fields; ``spread_skill_by_lead``: pooled over fields), and
    each field's own corrected SSR per lead (``spread_skill_by_field``), which pooling would hide."""
    valid = truth.sel(time=forecast.time + forecast.prediction_timedelta).drop_vars("time").assign_coords(time=forecast.time.values)
    leads = forecast.sizes["prediction_timedelta"]
    crps_values, variance, mse = np.zeros(leads), np.zeros(leads), np.zeros(leads)
    correction = (forecast.sizes["number"] + 1) / forecast.sizes["number"]
    by_field = {}
    for spec in fields:
        fc, tr = _field(forecast, spec) / scale[spec], _field(valid, spec) / scale[spec]
        crps_values += crps(fc, tr, dims=DIMS).transpose("prediction_timedelta").values
        v, e = (a.transpose("prediction_timedelta").values for a in mean_variance_and_mse(fc, tr, "number", list(DIMS)))
        variance += v
        mse += e
        by_field[spec] = np.sqrt(v / e * correction).tolist()
    return {"crps": float(crps_values.mean() / len(fields)), "spread_skill": math.sqrt(variance.sum() / mse.sum() * correction),
            "crps_by_lead": (crps_values / len(fields)).tolist(), "spread_skill_by_lead": np.sqrt(variance / mse * correction).tolist(),
            "spread_skill_by_field": by_field}


def validation_inits(truth: xr.Dataset, config: EnsembleCalibrationConfig, bounds: tuple[np.datetime64, np.datetime64]) -> np.ndarray:
    """The inits a calibration runs from: every ``config.every_days`` from a day after the validation
    period's start (``bounds``: its first and last time), each with truth to the longest lead it scores
    (``lead``, or ``per_lead.lead`` when per-lead tuning is on), at most ``config.inits`` of them."""
    longest = max([config.lead] + ([config.per_lead.lead] if config.per_lead.tune else []), key=lambda d: parse_hours(d, "lead"))
    inits = period_inits(truth.time.values, bounds, parse_hours(longest, "lead"), 24 * config.every_days)[: config.inits]
    if len(inits) == 0:
        raise BdlensError(f"the world's validation period has no init with {longest} of truth after it; use a longer world")
    return inits


def calibrate_system(
    forecaster: Forecaster, perturbation: str, analysis: xr.Dataset, truth: xr.Dataset, inits: Sequence[np.datetime64],
    config: EnsembleCalibrationConfig, bayes: bool = True,
) -> dict[str, Any]:
    """Search (amplitude, temperature) for ``perturbation``, then the per-lead factors when
    ``config.per_lead.tune`` (see the module docstring); returns the record. ``bayes=False``
    calibrates the scheme on the deterministic weights (no temperature to search)."""
    if not bayes:
        config = config.model_copy(update={"temperature": TemperatureSearch(tune=False), "weights": None})
    scale = field_scales(truth, config.fields)
    tune_amplitude = perturbation != "none"
    temperatures = len(config.temperature.values) if config.temperature.tune else 1
    per_lead = config.per_lead.tune and tune_amplitude
    expected = (1 + temperatures * (config.amplitude.max_evaluations if tune_amplitude else 1)) if config.amplitude.tune else 1
    expected += config.per_lead.iterations + 1 if per_lead else 0
    with bar(total=expected, desc=f"calibrate ({perturbation})", unit="eval") as progress:

        def run(a: float, t: float, lead: str, factors: dict[int, float]) -> dict[str, Any]:
            forecast = forecaster.ensemble(
                init=[str(i) for i in inits], members=config.members, weights=config.weights, lead=lead,
                output_step=config.output_step, perturbation=perturbation, seed=config.seed, data=analysis, bayes=bayes,
                temperature=t, amplitude=a if tune_amplitude else None, lead_factors=factors,
            )
            progress.update(1)
            return ensemble_scores(forecast, truth, scale, config.fields)

        fixed = None
        if not config.amplitude.tune:  # the system's (a, T), scored once so that the record reads as a searched one does
            current = forecaster.system.scheme(perturbation, bayes)
            fixed = (float(current.get("amplitude", 1.0)), float(current.get("temperature", 1.0)))
        result = calibrate(lambda a, t: run(a, t, config.lead, {}), config, tune_amplitude=tune_amplitude, fixed=fixed)
        by_lead = None
        if per_lead:
            output_hours, lead_hours = parse_hours(config.output_step, "output_step"), parse_hours(config.per_lead.lead, "per_lead.lead")
            leads = list(range(output_hours, lead_hours + 1, output_hours))
            by_lead = calibrate_lead_factors(lambda f: run(result["amplitude"], result["temperature"], config.per_lead.lead, f),
                                             leads, config.per_lead, config.penalty)
    units = ", ".join(f"{spec} {value:.4g}" for spec, value in scale.items())
    record = {
        "amplitude": result["amplitude"], "temperature": result["temperature"], "amplitude_kept": fixed is not None,
        "objective": f"J = CRPS_fair * (1 + {config.penalty} * ln(SSR_corrected)^2); fields {list(config.fields)} in units of their "
                     f"climatological anomaly std ({units}), latitude-weighted, leads to {config.lead} every {config.output_step}, "
                     f"{config.members} members ({f'K = {config.weights}' if bayes else 'deterministic weights'}), {len(inits)} validation "
                     "inits from the analysis vs the truth",
        "before": result["before"], "after": result["after"], "history": result["history"],
    }
    if by_lead is not None:
        record["lead_factors"] = by_lead["lead_factors"]
        record["per_lead"] = {
            "objective": f"mean over leads of CRPS_fair(L) * (1 + {config.penalty} * ln(SSR(L))^2), leads to {config.per_lead.lead}",
            **{k: by_lead[k] for k in ("before", "after", "history")},
        }
    return record


def _with_record(entry: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """A scheme's calibration ``entry`` updated with a calibration ``record`` (see :func:`write_system_file`)."""
    # Factors of an earlier per-lead calibration do not belong to a new (a, T), nor does its record.
    kept = {k: v for k, v in entry.items() if k not in ("lead_factors", "lead_calibration")}
    calibration = {k: v for k, v in record.items() if k not in ("history", "lead_factors", "amplitude_kept")}
    where = "lead_calibration" if record.get("amplitude_kept") else "calibration"
    if where == "calibration" and "history" in record:
        # The (a, T) trail in evaluation order, pooled scores only: which temperatures and amplitudes
        # were tried and how close the runners-up came. Every evaluation's per-lead, per-field arrays
        # (some 60 numbers each, about 25 evaluations per search) would double the system file.
        calibration["search"] = [{k: h[k] for k in SEARCH_KEYS} for h in record["history"]]
    updated = {**kept, "amplitude": record["amplitude"], "temperature": record["temperature"], where: calibration}
    if "lead_factors" in record:
        updated["lead_factors"] = {str(h): f for h, f in record["lead_factors"].items()}
    return updated


def write_system_file(out: Path, perturbation: str, record: dict[str, Any], base: dict[str, Any], make_default: bool,
                      bayes: bool = True) -> Path:
    """``out/ensemble.json``: ``base`` (the system's current file) with this scheme's calibration.

    The record goes to the scheme's ``calibration``; a record that kept the system's (a, T)
    (``amplitude.tune: false``) goes to ``lead_calibration`` instead, so the search that found (a, T)
    stays on record beside the one that found the per-lead factors on it. A calibration on the
    deterministic weights (``bayes=False``) goes to the scheme's ``without_posterior`` entry in the
    same way (:meth:`bdlens.ensemble.system.System.scheme`)."""
    system = dict(base)
    schemes = dict(system.get("schemes", {}))
    entry = dict(schemes.get(perturbation, {}))
    if bayes:
        schemes[perturbation] = _with_record(entry, record)
    else:
        schemes[perturbation] = {**entry, WITHOUT_POSTERIOR: _with_record(entry.get(WITHOUT_POSTERIOR, {}), record)}
    system["schemes"] = schemes
    if make_default:
        system["default_perturbation"] = perturbation
    path = mark_output(out, CALIBRATION_KIND) / SYSTEM_FILE
    path.write_text(json.dumps(system, indent=1, default=float))
    return path
