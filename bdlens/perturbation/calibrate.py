"""Calibration of the perturbation amplitude and the posterior temperature (docs/science.md §5).

Two knobs scale the ensemble spread at forecast time:
* the **amplitude** a: a multiplier on the learned network's σ (X_t' = X_t + μ + a·σ ε), or on the
  grid-point σ of every SPPT pattern scale (the pattern is still clipped to [−clip, clip]);
* the **posterior temperature** T: θ_k = μ + T·σ_q ε_k, a multiplier on the posterior σ at sampling
  time (optional; off by default).

**Objective.** On up to ``max_forecasts`` validation forecasts of K members, at the configured
leads, in normalised units over all channels (latitude-weighted):

    J(a, T) = CRPS(a, T) · (1 + λ · ln² SSR(a, T)),

where CRPS is the fair CRPS averaged over the leads and SSR the corrected spread-skill ratio
√(Σ_leads s² / Σ_leads MSE)·√((K+1)/K). The fair CRPS is proper, so for a well-specified model its
minimum is the calibrated spread, where SSR ≈ 1 as well; the penalty (λ = ``penalty``, 0 for pure
CRPS) breaks ties toward SSR = 1 when bias or a misspecified spatial structure pulls the two apart,
and treats an SSR of ½ and of 2 as equally bad. Every evaluation uses the same seeds (common random
numbers), so J is a smooth function of a and T.

**Search.** a: bounded Brent search (:func:`scipy.optimize.minimize_scalar`) over ln a in
[ln low, ln high]; T (when tuned): each value of a small grid, with the search over a inside.
The best (a, T) by J is kept; the result reports J, CRPS and SSR before (a = T = 1) and after.

:func:`calibrate` takes any ``evaluate(a, T) → {"crps", "spread_skill", ...}``, so it is tested on a
toy problem with a known spread; :func:`calibrate_checkpoint` runs it for a VI posterior with the
learned perturbation (:class:`~bdlens.perturbation.learned.PerturbedEnsemble`), SPPT
(:class:`SPPTEnsemble`) or the posterior alone, and writes ``calibration.json`` into its output directory.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize_scalar
from torch import Tensor
from torch.utils.data import Dataset

from bdlens.bayes.posterior import BayesianTransformer
from bdlens.configs import YamlConfig, portable_path
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.outputs import mark_output
from bdlens.perturbation.learned import CALIBRATION, PerturbedEnsemble, load_perturbation
from bdlens.perturbation.patterns import UnresolvedScaleWarning, init_keys_for
from bdlens.perturbation.sppt import SPPT, SPPTConfig, apply_sppt, load_sppt_config
from bdlens.progress import bar
from bdlens.training.ensemble_validation import ensemble_scores

State = tuple[Tensor, Tensor]
#: ``bdlens calibrate --out``: a bdlens output directory holding only these files.
CALIBRATION_KIND = "calibration"
CALIBRATED_SPPT = "perturbation_sppt_calibrated.yaml"
CALIBRATION_LAYOUT = (CALIBRATION, CALIBRATED_SPPT)
Evaluate = Callable[[float, float], dict[str, Any]]


class AmplitudeSearch(BaseModel):
    """Bounds and tolerance of the amplitude search (on ln a)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


class CalibrationConfig(YamlConfig):
    """A calibration configuration (``configs/calibrate_demo.yaml``)."""

    what: ClassVar[str] = "calibration config"

    members: int = Field(default=8, ge=2)
    leads: tuple[int, ...] = (1, 4)
    max_forecasts: int = Field(default=16, gt=0)
    batch_size: int = Field(default=4, gt=0)
    seed: int = 2024
    penalty: float = Field(default=1.0, ge=0, description="λ of J = CRPS·(1 + λ ln² SSR)")
    amplitude: AmplitudeSearch = AmplitudeSearch()
    temperature: TemperatureSearch = TemperatureSearch()


def objective(crps: float, spread_skill: float, penalty: float) -> float:
    """J = CRPS · (1 + λ ln² SSR) (see the module docstring)."""
    return crps * (1.0 + penalty * math.log(spread_skill) ** 2)


def calibrate(evaluate: Evaluate, config: CalibrationConfig, tune_amplitude: bool = True) -> dict[str, Any]:
    """Search (a, T) minimising J; ``evaluate(a, T)`` returns at least ``crps`` and ``spread_skill``.

    Returns {"amplitude", "temperature", "before", "after", "history"}: ``before``/``after`` are the
    evaluations at (1, 1) and at the optimum (with ``objective`` added), ``history`` every evaluation.
    """
    temperatures = config.temperature.values if config.temperature.tune else (1.0,)
    if not tune_amplitude and len(temperatures) == 1:
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


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-lead :func:`~bdlens.training.ensemble_validation.ensemble_scores` rows: CRPS averaged over the leads,
    SSR = √(Σ s² / Σ MSE)·√((K+1)/K); the rows are kept under ``per_lead``."""
    k = rows[0]["members"]
    variance, mse = sum(r["variance"] for r in rows), sum(r["mse"] for r in rows)
    return {
        "crps": float(np.mean([r["crps"] for r in rows])),
        "spread_skill": math.sqrt(variance / mse * (k + 1) / k) if mse > 0 else math.nan,
        "per_lead": [{key: r[key] for key in ("lead_steps", "crps", "rmse", "spread", "spread_skill")} for r in rows],
    }


class SPPTEnsemble:
    """K posterior members with SPPT on the backbone's tendency (:func:`~bdlens.perturbation.sppt.apply_sppt`).

    Normalised units in and out, like :class:`~bdlens.perturbation.learned.PerturbedEnsemble`
    (shared (B, …) or per-member (K, B, …) states → (K, B, …)); SPPT itself runs on physical fields
    (``layout``, ``stats``). Member k of the forecast with init key i has its own pattern, drawn from
    (seed, i, k), advanced one step per call and restarted at a shared state; :meth:`start` sets the
    init keys of the next rollout (default: the positions 0..B−1 in the batch), so a forecast's pattern
    does not depend on which other forecasts share its batch.
    """

    def __init__(
        self,
        bayes: BayesianTransformer,
        sppt: SPPT,
        layout: FieldLayout,
        stats: NormStats,
        members: int | Sequence[int],
        seed: int,
        constants: Tensor | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.posterior = PerturbedEnsemble(bayes, None, members, seed, constants, temperature=temperature)
        self.sppt, self.layout, self.stats, self.seed = sppt, layout, stats, int(seed)
        self.pattern = None
        self.init_keys: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """K, the number of members."""
        return self.posterior.size

    def start(self, init_keys: Sequence[int]) -> None:
        """Key the patterns of the next rollout to these forecasts (one integer per forecast of the batch)."""
        self.init_keys = tuple(int(k) for k in init_keys)
        self.pattern = None

    def step(self, previous: State | None, current: State) -> State:
        """(X_{t−Δ}, X_t) → SPPT-perturbed X_{t+Δ} for every member."""
        shared = current[0].ndim == 5
        if shared or self.pattern is None:
            keys = init_keys_for(self.init_keys, current[0].shape[-5])
            self.pattern = self.sppt.init(self.seed, self.posterior.members, inits=keys)
        forecast = self.posterior.step(previous, current)
        k, b = forecast[0].shape[:2]
        start = tuple(x.expand(k, *x.shape) if shared else x for x in current)
        x_phys = self.layout.denormalise(_merge(start), self.stats)
        f_phys = self.layout.denormalise(_merge(forecast), self.stats)
        pattern = self.sppt.pattern.field(self.pattern).reshape(k * b, *forecast[1].shape[-2:])
        upper, surface = apply_sppt(
            *x_phys, *f_phys, pattern.to(f_phys[0].dtype),
            levels_hpa=self.sppt.levels_hpa, upper_variables=self.sppt.upper_variables,
            surface_variables=self.sppt.surface_variables, latitude=self.sppt.pattern.grid.latitudes(), config=self.sppt.config,
        )
        self.pattern = self.sppt.step(self.pattern)
        perturbed = self.layout.normalise(Fields(upper, surface), self.stats)
        return tuple(x.reshape(k, b, *x.shape[1:]) for x in perturbed)


def _merge(state: State) -> Fields:
    """(K, B, …) → (K·B, …) as :class:`bdlens.data.Fields`."""
    return Fields(*(x.reshape(-1, *x.shape[2:]) for x in state))


def scaled_sppt(config: SPPTConfig, amplitude: float) -> SPPTConfig:
    """``config`` with every pattern scale's σ multiplied by ``amplitude``."""
    scales = [s.model_copy(update={"sigma": s.sigma * amplitude}) for s in config.scales]
    return config.model_copy(update={"scales": scales})


def calibrate_checkpoint(
    bayes: BayesianTransformer,
    vi_manifest: dict[str, Any],
    val_set: Dataset,
    config: CalibrationConfig,
    out_dir: str | Path,
    perturb: str | Path | None = None,
    sppt: str | Path | None = None,
    vi_dir: str | Path | None = None,
    constants: Tensor | None = None,
    provenance: dict[str, Any] | None = None,
    beside: str | Path | None = None,
) -> dict[str, Any]:
    """Calibrate a VI posterior with the learned perturbation (``perturb``), SPPT (``sppt`` config) or
    neither (temperature only) on ``val_set``; write ``out_dir/calibration.json`` (the directory marked
    as a bdlens output) and, when given, the same record to the file ``beside`` (e.g. beside the
    calibrated checkpoint's manifest, where forecasts read it from); return the result."""
    layout, stats = val_set.layout, val_set.stats
    members = config.members
    if perturb is not None:
        network, manifest = load_perturbation(perturb)
        if NormStats.from_dict(manifest["norm_stats"]).key != stats.key:
            raise BdlensError(f"{perturb} was trained with other normalisation statistics than {vi_dir}; use the matching posterior")
        method = "learned"

        def make(a: float, t: float) -> Any:
            return PerturbedEnsemble(bayes, network, members, config.seed, constants, sigma_scale=a, temperature=t)
    elif sppt is not None:
        sppt_config = load_sppt_config(sppt)
        method = "sppt"
        built: dict[float, SPPT] = {}

        def make(a: float, t: float) -> Any:
            if a not in built:
                with warnings.catch_warnings():
                    if built:  # an unresolved pattern scale is reported once, for the first amplitude
                        warnings.simplefilter("ignore", UnresolvedScaleWarning)
                    built[a] = SPPT(layout.grid, layout.levels, layout.upper_variables, layout.surface_variables, scaled_sppt(sppt_config, a))
            return SPPTEnsemble(bayes, built[a], layout, stats, members, config.seed, constants, temperature=t)
    else:
        method = "posterior"

        def make(a: float, t: float) -> Any:
            return PerturbedEnsemble(bayes, None, members, config.seed, constants, temperature=t)

    temperatures = len(config.temperature.values) if config.temperature.tune else 1
    expected = 1 + temperatures * (config.amplitude.max_evaluations if method != "posterior" else 1)
    with bar(total=expected, desc=f"calibrate ({method})", unit="eval") as progress:

        def evaluate(a: float, t: float) -> dict[str, Any]:
            rows = ensemble_scores(make(a, t), val_set, config.leads, config.max_forecasts, config.batch_size)
            progress.update(1)
            return summarise(rows)

        result = calibrate(evaluate, config, tune_amplitude=method != "posterior")
    record = {
        "method": method,
        "amplitude": result["amplitude"],
        "temperature": result["temperature"],
        "amplitude_meaning": {"learned": "multiplier on the learned σ", "sppt": "multiplier on every SPPT pattern scale's σ",
                              "posterior": "unused (no perturbation)"}[method],
        "objective": f"J = CRPS_fair * (1 + {config.penalty} * ln(SSR_corrected)^2), normalised units, latitude-weighted, "
                     f"all channels, leads {list(config.leads)} steps, {config.members} members",
        "before": result["before"],
        "after": result["after"],
        "history": [{k: v for k, v in r.items() if k != "per_lead"} for r in result["history"]],
        "config": config.model_dump(mode="json"),
        "posterior_checkpoint": None if vi_dir is None else portable_path(vi_dir),
        "perturbation_checkpoint": None if perturb is None else portable_path(perturb),
        "sppt_config": None if sppt is None else str(sppt),
        "provenance": provenance or {},
    }
    out_dir = mark_output(out_dir, CALIBRATION_KIND)
    text = json.dumps(record, indent=1)
    (out_dir / CALIBRATION).write_text(text)
    if method == "sppt":
        calibrated = scaled_sppt(sppt_config, result["amplitude"]).model_dump(mode="json")
        (out_dir / CALIBRATED_SPPT).write_text(
            f"# SPPT config calibrated by bdlens calibrate (amplitude {result['amplitude']:.4g} on {sppt})\n" + yaml.safe_dump(calibrated)
        )
    if beside is not None:
        Path(beside).write_text(text)
    return record
