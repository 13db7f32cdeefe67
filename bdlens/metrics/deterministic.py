"""Ensemble-mean RMSE (plain and debiased), the anomaly correlation coefficient and the members'
activity ratio (docs/science.md §7)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from bdlens.errors import BdlensError
from bdlens.metrics.weighting import XArray, annotate, require_members, resolve_dims, weighted_mean, weighted_sum

SPACE_DIMS: tuple[str, ...] = ("latitude", "longitude")


def ensemble_mean(forecast: XArray, member_dim: Hashable) -> XArray:
    """The ensemble mean over ``member_dim`` (NaN if any member is NaN), or ``forecast`` if it has none."""
    if member_dim in forecast.dims:
        return forecast.mean(member_dim, skipna=False)
    return forecast


def ensemble_mean_mse(
    forecast: XArray,
    truth: XArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    debiased: bool = False,
) -> XArray:
    """Mean squared error of the ensemble mean, averaged over ``dims`` (units²).

    ``debiased=True`` subtracts s²/M per point (s² the unbiased ensemble variance), the finite-ensemble
    estimate of the MSE of the infinite-ensemble mean; it may be negative on small samples.
    """
    if debiased:
        size = require_members(forecast, member_dim, minimum=2)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    error2 = (ensemble_mean(forecast, member_dim) - truth) ** 2
    if debiased:
        error2 = error2 - forecast.var(member_dim, ddof=1, skipna=False) / size
    return annotate(
        weighted_mean(error2, reduce_dims),
        reduce_dims,
        metric="debiased ensemble-mean MSE (MSE - s^2/M)" if debiased else "ensemble-mean MSE",
    )


def ensemble_mean_rmse(
    forecast: XArray,
    truth: XArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    debiased: bool = False,
) -> XArray:
    """RMSE of the ensemble mean: the square root is taken *after* averaging the MSE over ``dims``.

    A forecast without ``member_dim`` is scored as a deterministic forecast. ``debiased=True`` takes
    the root of MSE − s²/M, clipped at 0 before the root (the attrs say so).
    """
    mse = ensemble_mean_mse(forecast, truth, member_dim, dims, debiased)
    attrs = dict(mse.attrs)
    rmse = np.sqrt(mse.clip(min=0.0)) if debiased else np.sqrt(mse)
    attrs["metric"] = (
        "sqrt of debiased ensemble-mean MSE (clipped at 0)" if debiased else "ensemble-mean RMSE (sqrt after averaging)"
    )
    rmse.attrs.update(attrs)
    return rmse


def acc(
    forecast: XArray,
    truth: XArray,
    climatology: XArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
) -> XArray:
    """Anomaly correlation coefficient of the ensemble mean against ``climatology`` (dimensionless).

    Anomalies are taken against the given climatology (it broadcasts against the truth, e.g. a time
    mean with dims level, latitude, longitude). The (uncentred, WB2-style) correlation
    Σ w f′o′ / sqrt(Σ w f′² · Σ w o′²) is taken over the spatial dimensions among ``dims`` with
    cell-area weights, per remaining point, then averaged over the other dimensions in ``dims``.
    """
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    space = tuple(d for d in reduce_dims if d in SPACE_DIMS)
    if not space:
        raise BdlensError(f"ACC needs latitude and/or longitude among the reduced dims, got {reduce_dims}")
    rest = tuple(d for d in reduce_dims if d not in space)
    fa = ensemble_mean(forecast, member_dim) - climatology
    oa = truth - climatology
    # Both anomalies must be valid where either is used, or the three sums cover different points.
    valid = fa.notnull() & oa.notnull()
    fa, oa = fa.where(valid), oa.where(valid)
    corr = weighted_sum(fa * oa, space) / np.sqrt(weighted_sum(fa**2, space) * weighted_sum(oa**2, space))
    result = weighted_mean(corr, rest)
    return annotate(result, reduce_dims, metric="ACC of the ensemble mean (uncentred, correlation over space)")



def activity_ratio(forecast: XArray, truth: XArray, climatology: XArray, member_dim: Hashable = "number",
                   dims: Sequence[Hashable] | None = None) -> XArray:
    """Activity of the members relative to the truth's (dimensionless): sqrt(mean_i mean w (x_i − c)² / mean w (y − c)²).

    The rms anomaly from ``climatology`` of every member (not of the ensemble mean), over the truth's,
    both averaged over ``dims`` (cell-area weights) before the ratio. 1 when the members vary as much
    as the world does; a smoothing forecast (an MSE-trained model's mean) falls below 1 with lead, and
    members that drift into a more active regime than the world's rise above it (docs/science.md §7).
    A forecast without ``member_dim`` is one member.
    """
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    anomaly2 = (forecast - climatology) ** 2
    if member_dim in forecast.dims:
        anomaly2 = anomaly2.mean(member_dim, skipna=False)
    truth2 = (truth - climatology) ** 2
    # The same points in both averages, or the ratio compares different samples.
    valid = anomaly2.notnull() & truth2.notnull()
    ratio = np.sqrt(weighted_mean(anomaly2.where(valid), reduce_dims) / weighted_mean(truth2.where(valid), reduce_dims))
    return annotate(ratio, reduce_dims, metric="activity ratio: rms member anomaly / rms truth anomaly")
