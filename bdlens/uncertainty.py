"""Epistemic / aleatoric variance decomposition and the theorem checks of docs/science.md §6.

Members y_kj (k = weight sample θ_k, j = perturbation draw ξ_kj) are identified by the coordinates
``weight_sample`` and ``perturbation_draw`` on the member dimension. The design must be balanced:
K ≥ 2 weight samples, each with the same J ≥ 2 draws.

One-way random-effects ANOVA (unbiased for any K, J ≥ 2; :func:`bdlens.ensemble.design.anova`):
    aleatoric  Â = mean_k s_k²                    (within-group variance, divisor J − 1)
    epistemic  Ê = s²(group means) − Â / J        (divisor K − 1; may be negative on small samples)
    total      = Ê + Â
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr

from bdlens.ensemble.design import PERTURBATION_DRAW, WEIGHT_SAMPLE, anova
from bdlens.errors import BdlensError
from bdlens.metrics.crps import crps
from bdlens.metrics.probabilistic import mean_variance_and_mse
from bdlens.metrics.weighting import annotate, require_members, resolve_dims, weighted_mean, whole_members


def _design_coords(forecast: xr.DataArray | xr.Dataset, member_dim: Hashable) -> bool:
    return all(name in forecast.coords and forecast[name].dims == (member_dim,) for name in (WEIGHT_SAMPLE, PERTURBATION_DRAW))


def has_design(forecast: xr.DataArray | xr.Dataset, member_dim: Hashable = "number") -> bool:
    """Whether the member dimension carries the ``weight_sample`` and ``perturbation_draw`` coordinates
    of a design that can be split: at least 2 weight samples and 2 draws (an engine run with K = 1 or
    J = 1 writes the coordinates too, but has nothing to split)."""
    if not _design_coords(forecast, member_dim):
        return False
    return min(np.unique(forecast[WEIGHT_SAMPLE].values).size, np.unique(forecast[PERTURBATION_DRAW].values).size) >= 2


def grouped(forecast: xr.DataArray, member_dim: Hashable = "number") -> xr.DataArray:
    """The forecast with ``member_dim`` split into dims (``weight_sample``, ``perturbation_draw``), lazily.

    Members are reordered by (k, j) and reshaped; raises :class:`BdlensError` if the coordinates are
    missing or the design is not a balanced K × J grid with K, J ≥ 2.
    """
    require_members(forecast, member_dim, minimum=4)
    if not _design_coords(forecast, member_dim):
        raise BdlensError(
            f"forecast member dim {member_dim!r} lacks the {WEIGHT_SAMPLE!r} and {PERTURBATION_DRAW!r} coordinates "
            "needed to split epistemic from aleatoric variance (bdlens forecasts write them)"
        )
    k = np.asarray(forecast[WEIGHT_SAMPLE].values)
    j = np.asarray(forecast[PERTURBATION_DRAW].values)
    ks, js = np.unique(k), np.unique(j)
    pairs = {(a, b) for a, b in zip(k.tolist(), j.tolist(), strict=True)}
    if len(ks) < 2 or len(js) < 2 or len(pairs) != k.size or k.size != len(ks) * len(js):
        raise BdlensError(
            f"the ensemble is not a balanced grid of weight samples x perturbation draws with both at least 2 "
            f"(found {len(ks)} weight samples, {len(js)} draws, {k.size} members, {len(pairs)} distinct pairs)"
        )
    order = np.lexsort((j, k))
    ordered = whole_members(forecast, member_dim).isel({member_dim: order}).drop_vars([WEIGHT_SAMPLE, PERTURBATION_DRAW, member_dim], errors="ignore")
    split = ordered.coarsen({member_dim: len(js)}).construct({member_dim: (WEIGHT_SAMPLE, PERTURBATION_DRAW)})
    return split.assign_coords({WEIGHT_SAMPLE: ks, PERTURBATION_DRAW: js})


def decompose(forecast: xr.DataArray, member_dim: Hashable = "number", dims: Sequence[Hashable] = ()) -> xr.Dataset:
    """Epistemic, aleatoric and total predictive variance (units²), per point unless ``dims`` are given.

    Returns a Dataset with ``epistemic`` (Ê, not clipped), ``aleatoric`` (Â) and ``total`` (Ê + Â),
    averaged over ``dims`` with the shared reduction rules (cell-area weights along latitude).
    """
    split = grouped(forecast, member_dim)
    n_draws = split.sizes[PERTURBATION_DRAW]
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    out = anova(split)
    return annotate(
        weighted_mean(out, reduce_dims),
        reduce_dims,
        estimator="one-way random-effects ANOVA: A = mean_k s_k^2 (ddof 1), E = s^2(group means) - A/J (unclipped)",
        weight_samples=split.sizes[WEIGHT_SAMPLE],
        perturbation_draws=n_draws,
    )


def total_variance_check(forecast: xr.DataArray, member_dim: Hashable = "number", dims: Sequence[Hashable] | None = None) -> xr.Dataset:
    """The law of total variance on the ensemble itself (docs/science.md §6.1), as a numerical check.

    With population (divisor-N) moments, the variance of all members equals the variance of the
    group means plus the mean within-group variance, exactly. Returns ``total``, ``between``,
    ``within`` and ``relative_residual`` = |total − between − within| / total after averaging over
    ``dims``; a residual above rounding level means the member coordinates do not describe the ensemble.
    """
    split = grouped(forecast, member_dim)
    members = (WEIGHT_SAMPLE, PERTURBATION_DRAW)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    out = xr.Dataset(
        {
            "total": split.var(members, ddof=0, skipna=False),
            "between": split.mean(PERTURBATION_DRAW, skipna=False).var(WEIGHT_SAMPLE, ddof=0, skipna=False),
            "within": split.var(PERTURBATION_DRAW, ddof=0, skipna=False).mean(WEIGHT_SAMPLE),
        }
    )
    out = weighted_mean(out, reduce_dims)
    out["relative_residual"] = abs(out["total"] - out["between"] - out["within"]) / out["total"]
    return annotate(out, reduce_dims, check="law of total variance (population moments)")


def mixture_crps_check(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    fair: bool = False,
) -> xr.Dataset:
    """CRPS of the whole ensemble (the mixture over θ) vs the mean CRPS of its per-θ sub-ensembles.

    Returns ``mixture``, ``mean_per_weight_sample`` and ``gap`` = mean_per_weight_sample − mixture
    (≥ 0 by convexity, docs/science.md §6.3). With the standard (empirical-CDF) CRPS, the default, the mixture's
    ECDF is the mean of the sub-ensembles' ECDFs and the gap is ≥ 0 at every point exactly; the fair
    CRPS estimates the same quantities without bias but only satisfies the inequality on average.
    """
    split = grouped(forecast, member_dim)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    mixture = crps(forecast, truth, member_dim, dims=(), fair=fair)
    per_sample = crps(split, truth, PERTURBATION_DRAW, dims=(), fair=fair).mean(WEIGHT_SAMPLE, skipna=False)
    valid = mixture.notnull() & per_sample.notnull()
    out = xr.Dataset({"mixture": mixture.where(valid), "mean_per_weight_sample": per_sample.where(valid)})
    out = weighted_mean(out, reduce_dims)
    out["gap"] = out["mean_per_weight_sample"] - out["mixture"]
    return annotate(out, reduce_dims, check="mixture CRPS <= mean per-weight-sample CRPS", crps="fair" if fair else "standard")


def calibration_check(
    forecast: xr.DataArray, truth: xr.DataArray, member_dim: Hashable = "number", dims: Sequence[Hashable] | None = None
) -> xr.Dataset:
    """The calibration identity E[(ȳ − y)²] = (M+1)/M · E[s²] (docs/science.md §6.4) on a forecast.

    Returns ``mse`` (ensemble-mean MSE), ``expected_mse`` ((M+1)/M times the mean unbiased variance)
    and ``ratio`` = mse / expected_mse, which is 1 up to sampling error for a calibrated ensemble
    (> 1 under-dispersive, < 1 over-dispersive). Works on any ensemble; no design coordinates needed.
    """
    size = require_members(forecast, member_dim, minimum=2)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    variance, mse = mean_variance_and_mse(forecast, truth, member_dim, reduce_dims)
    expected = variance * (size + 1) / size
    out = xr.Dataset({"mse": mse, "expected_mse": expected, "ratio": mse / expected})
    return annotate(out, reduce_dims, check="calibration identity E[(mean - y)^2] = (M+1)/M E[s^2]")
