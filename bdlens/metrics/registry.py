"""The one registry of verification metrics: ``bdlens evaluate``, ``bdlens report`` and the API read it.

Each entry is a :class:`Metric`: a name, a function of one :class:`Inputs` (plus keyword options)
whose docstring states the formula, a one-line description, default options and what it needs
(ensemble size, the K × J weight-sample design). Adding a metric means writing one such function and
adding one entry to :data:`METRICS`; the evaluation engine, the CSV tables and the report pick it up.

Kinds: ``score`` (a value per lead and level after averaging over init time and area; an extra
``quantile`` dim is flattened to one score per quantile, e.g. ``brier_q0.9``), ``diagnostic``
(extra dims such as ``rank``, kept as arrays) and ``check`` (the theorem checks of docs/science.md §6, computed
by the report; ``bdlens evaluate`` leaves them out unless asked). Conventions: docs/science.md §7 and
``docs/science.md``; the reductions are those of :mod:`bdlens.metrics.weighting`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import xarray as xr

from bdlens.errors import BdlensError
from bdlens.metrics.crps import crps as _crps
from bdlens.metrics.deterministic import acc as _acc
from bdlens.metrics.deterministic import activity_ratio, ensemble_mean_rmse
from bdlens.metrics.probabilistic import brier_score, rank_histogram, reliability, spread_skill_ratio
from bdlens.metrics.probabilistic import energy_score as _energy_score
from bdlens.metrics.probabilistic import spread as _spread
from bdlens.metrics.spectra import zonal_spectra
from bdlens.uncertainty import calibration_check, decompose, has_design, mixture_crps_check, total_variance_check

Kind = Literal["score", "diagnostic", "check"]
Result = xr.DataArray | xr.Dataset


@dataclass(frozen=True)
class Inputs:
    """What a metric sees: one variable's forecast and the truth aligned to its valid times.

    ``forecast`` has the member dim ``member_dim`` (size M ≥ 1) plus (time, [prediction_timedelta,
    level,] latitude, longitude); ``truth`` the same dims without members. ``dims`` are the dims
    averaged over (init time and area by default). ``climatology`` broadcasts against the truth
    (for ACC); ``thresholds`` has a ``quantile`` dim (Brier scores, reliability); ``seed`` seeds the
    rank histogram's tie breaking.
    """

    forecast: xr.DataArray
    truth: xr.DataArray
    member_dim: str = "number"
    dims: tuple[str, ...] = ("time", "latitude", "longitude")
    climatology: xr.DataArray | None = None
    thresholds: xr.DataArray | None = None
    seed: int = 0

    @property
    def members(self) -> int:
        """M, the ensemble size."""
        return self.forecast.sizes[self.member_dim]

    @property
    def design(self) -> bool:
        """Whether the members carry the weight-sample × perturbation-draw coordinates."""
        return has_design(self.forecast, self.member_dim)


@dataclass(frozen=True)
class Metric:
    """One registry entry; call it with :class:`Inputs` (keyword options override the defaults)."""

    name: str
    function: Callable[..., Result]
    description: str
    kind: Kind = "score"
    options: Mapping[str, Any] = field(default_factory=dict)
    min_members: int = 2
    needs_design: bool = False
    needs: tuple[str, ...] = ()  # optional inputs that must be given: "climatology", "thresholds"

    def __call__(self, inputs: Inputs, **options: Any) -> Result:
        return self.function(inputs, **{**self.options, **options})

    @property
    def formula(self) -> str:
        """The function's docstring: the formula of the metric."""
        return " ".join((self.function.__doc__ or "").split())

    def applies_to(self, inputs: Inputs) -> bool:
        """Whether ``inputs`` have what the metric needs (members, design, climatology, thresholds)."""
        return (
            inputs.members >= self.min_members
            and (inputs.design or not self.needs_design)
            and all(getattr(inputs, need) is not None for need in self.needs)
        )


def crps(x: Inputs, fair: bool = True) -> xr.DataArray:
    """fair: mean_i|x_i − y| − Σ_{i,j}|x_i − x_j| / (2M(M−1)); standard (empirical CDF): the same with 2M²."""
    return _crps(x.forecast, x.truth, x.member_dim, x.dims, fair=fair)


def rmse(x: Inputs, debiased: bool = False) -> xr.DataArray:
    """sqrt(mean (x̄ − y)²), the root taken after the average; debiased: sqrt(max(0, mean((x̄ − y)² − s²/M)))."""
    return ensemble_mean_rmse(x.forecast, x.truth, x.member_dim, x.dims, debiased=debiased)


def spread(x: Inputs) -> xr.DataArray:
    """sqrt(mean s²), s² = Σ_i (x_i − x̄)² / (M − 1) per point."""
    return _spread(x.forecast, x.member_dim, x.dims)


def spread_skill(x: Inputs, corrected: bool = True) -> xr.DataArray:
    """spread / RMSE; corrected: times sqrt((M + 1)/M), so that a calibrated ensemble scores 1."""
    return spread_skill_ratio(x.forecast, x.truth, x.member_dim, x.dims, corrected=corrected)


def acc(x: Inputs) -> xr.DataArray:
    """Σ w f′o′ / sqrt(Σ w f′² · Σ w o′²) over the area, f′ = x̄ − c, o′ = y − c (c the climatology); mean over time."""
    return _acc(x.forecast, x.truth, x.climatology, x.member_dim, x.dims)


def activity(x: Inputs) -> xr.DataArray:
    """sqrt(mean_i mean w (x_i − c)² / mean w (y − c)²), c the climatology: the members' rms anomaly over the truth's."""
    return activity_ratio(x.forecast, x.truth, x.climatology, x.member_dim, x.dims)


def energy_score(x: Inputs) -> xr.DataArray:
    """mean_i‖x_i − y‖ − Σ_{i,j}‖x_i − x_j‖ / (2M(M−1)), ‖·‖ the area-weighted norm over the latitude × longitude field."""
    return _energy_score(x.forecast, x.truth, x.member_dim, dims=[d for d in x.dims if d not in ("latitude", "longitude")])


def brier(x: Inputs, fair: bool = False) -> xr.DataArray:
    """mean (p − o)², p = #{i: x_i > q}/M, o = [y > q], q a climatological quantile; fair: minus p(1 − p)/(M − 1)."""
    return brier_score(x.forecast, x.truth, x.thresholds, x.member_dim, x.dims, fair=fair)


def epistemic_variance(x: Inputs) -> xr.DataArray:
    """Ê = s²(group means over draws, divisor K − 1) − Â/J, one-way random-effects ANOVA, unclipped."""
    return decompose(x.forecast, x.member_dim, x.dims)["epistemic"]


def aleatoric_variance(x: Inputs) -> xr.DataArray:
    """Â = mean_k s_k², s_k² the variance of weight sample k's J draws (divisor J − 1)."""
    return decompose(x.forecast, x.member_dim, x.dims)["aleatoric"]


def mixture_crps_gap(x: Inputs) -> xr.DataArray:
    """mean_k CRPS(sub-ensemble k) − CRPS(all members), standard CRPS; ≥ 0 by convexity (docs/science.md §6.3)."""
    return mixture_crps_check(x.forecast, x.truth, x.member_dim, x.dims)["gap"]


def rank(x: Inputs) -> xr.DataArray:
    """Frequency of rank r = #{i: x_i < y} (+ random share of ties), r = 0..M, cell-area weighted; flat for a calibrated ensemble."""
    return rank_histogram(x.forecast, x.truth, x.member_dim, x.dims, seed=x.seed)


def reliability_diagram(x: Inputs) -> xr.Dataset:
    """Per forecast probability k/M of "value > q": observed frequency of the event and the share of cases."""
    return reliability(x.forecast, x.truth, x.thresholds, x.member_dim, x.dims)


def spectrum(x: Inputs) -> xr.Dataset:
    """P(k) = |FFT_k(x)|²/N² (one-sided, Σ_k P = zonal mean of x²), members' mean vs truth, averaged over time and latitude."""
    return zonal_spectra(x.forecast, x.truth, x.member_dim, [d for d in x.dims if d != "longitude"])


def total_variance(x: Inputs) -> xr.Dataset:
    """|Var(all) − Var_k(group means) − mean_k Var(draws)| / Var(all), population moments (docs/science.md §6.1); rounding level."""
    return total_variance_check(x.forecast, x.member_dim, x.dims)


def mixture_crps(x: Inputs) -> xr.Dataset:
    """CRPS(mixture) and mean_k CRPS(sub-ensemble k), standard CRPS; gap = difference ≥ 0 (docs/science.md §6.3)."""
    return mixture_crps_check(x.forecast, x.truth, x.member_dim, x.dims)


def calibration(x: Inputs) -> xr.Dataset:
    """ratio = mean (x̄ − y)² / ((M + 1)/M · mean s²), 1 for a calibrated ensemble (docs/science.md §6.4)."""
    return calibration_check(x.forecast, x.truth, x.member_dim, x.dims)


METRICS: Mapping[str, Metric] = MappingProxyType(
    {
        m.name: m
        for m in (
            Metric("crps", crps, "fair CRPS (WB2), mean over init time and area", options={"fair": True}),
            Metric("crps_standard", crps, "standard (empirical-CDF) CRPS; the MAE for one member", options={"fair": False}, min_members=1),
            Metric("rmse", rmse, "ensemble-mean RMSE, sqrt after averaging the MSE", min_members=1),
            Metric("rmse_debiased", rmse, "sqrt of (MSE - s^2/M), clipped at 0", options={"debiased": True}),
            Metric("spread", spread, "sqrt of mean unbiased ensemble variance"),
            Metric("spread_skill_raw", spread_skill, "spread / RMSE, no correction", options={"corrected": False}),
            Metric("spread_skill_corrected", spread_skill, "spread / RMSE times sqrt((M+1)/M)", options={"corrected": True}),
            Metric("acc", acc, "ACC of the ensemble mean against the climatology", min_members=1, needs=("climatology",)),
            Metric("activity", activity, "members' rms anomaly / the truth's (1: as active as the world)", min_members=1,
                   needs=("climatology",)),
            Metric("energy_score", energy_score, "fair energy score over the latitude x longitude field (area-weighted norm)"),
            Metric("brier", brier, "Brier score of value > climatological quantile", min_members=1, needs=("thresholds",)),
            Metric("fair_brier", brier, "Brier score of value > climatological quantile (fair)", options={"fair": True}, needs=("thresholds",)),
            Metric(
                "epistemic_variance",
                epistemic_variance,
                "random-effects ANOVA epistemic variance (unclipped), mean over init time and area",
                min_members=4,
                needs_design=True,
            ),
            Metric(
                "aleatoric_variance",
                aleatoric_variance,
                "random-effects ANOVA aleatoric variance, mean over init time and area",
                min_members=4,
                needs_design=True,
            ),
            Metric(
                "mixture_crps_gap",
                mixture_crps_gap,
                "mean per-weight-sample standard CRPS minus mixture standard CRPS (>= 0)",
                min_members=4,
                needs_design=True,
            ),
            Metric("rank_histogram", rank, "rank histogram, M+1 bins, cell-area weighted frequencies", "diagnostic", min_members=1),
            Metric("reliability", reliability_diagram, "reliability diagram of value > climatological quantile", "diagnostic", min_members=1, needs=("thresholds",)),
            Metric("spectrum", spectrum, "zonal power spectrum of the members (mean) and of the truth", "diagnostic", min_members=1),
            Metric("total_variance", total_variance, "law of total variance on the members (docs/science.md §6.1)", "check", min_members=4, needs_design=True),
            Metric("mixture_crps", mixture_crps, "mixture CRPS vs mean per-weight-sample CRPS (docs/science.md §6.3)", "check", min_members=4, needs_design=True),
            Metric("calibration", calibration, "calibration identity E[(mean - y)^2] = (M+1)/M E[s^2] (docs/science.md §6.4)", "check"),
        )
    }
)

DEFAULT_KINDS: tuple[Kind, ...] = ("score", "diagnostic")


def select(names: Iterable[str] | None = None, kinds: Iterable[Kind] = DEFAULT_KINDS) -> list[Metric]:
    """Registry entries by name (in the given order), or every entry of ``kinds`` in registry order."""
    if names is None:
        kinds = tuple(kinds)
        return [m for m in METRICS.values() if m.kind in kinds]
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise BdlensError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return [METRICS[n] for n in names]


def compute(metrics: Iterable[Metric], inputs: Inputs) -> dict[str, xr.DataArray]:
    """Every applicable metric on ``inputs``, lazily, flattened to named DataArrays (attrs dropped).

    Scores with a ``quantile`` dim become one entry per quantile (``NAME_q0.9``); Dataset results
    become one entry per variable (``NAME_VARIABLE``, e.g. ``reliability_bin_fraction``).
    """
    out: dict[str, xr.DataArray] = {}
    for metric in metrics:
        if not metric.applies_to(inputs):
            continue
        value = metric(inputs)
        if isinstance(value, xr.Dataset):
            out.update({f"{metric.name}_{var}": value[var].drop_attrs() for var in value.data_vars})
        elif metric.kind == "score" and "quantile" in value.dims:
            out.update({f"{metric.name}_q{q:g}": value.sel(quantile=q, drop=True).drop_attrs() for q in value["quantile"].values})
        else:
            out[metric.name] = value.drop_attrs()
    return out


def description(name: str) -> str:
    """The description of a registry entry or of one of its flattened outputs (``brier_q0.9``)."""
    if name in METRICS:
        return METRICS[name].description
    base = max((m for m in METRICS if name.startswith(f"{m}_")), key=len, default=None)
    if base is None:
        raise KeyError(name)
    return f"{METRICS[base].description} ({name.removeprefix(base + '_')})"
