"""Spread, spread-skill, rank histograms, Brier scores with reliability data and the energy score (docs/science.md §7).

These functions take DataArrays. NaN policy as in :mod:`bdlens.metrics.weighting`: a point where the
truth or any member is NaN is NaN (or, for the histograms, left out), and reductions skip it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import dask.array
import numpy as np
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.metrics.weighting import annotate, lat_weights, require_members, resolve_dims, weighted_mean, weighted_sum, whole_members


def spread(forecast: xr.DataArray, member_dim: Hashable = "number", dims: Sequence[Hashable] | None = None) -> xr.DataArray:
    """Ensemble spread: sqrt of the mean (over ``dims``, like the MSE) unbiased ensemble variance (ddof=1)."""
    require_members(forecast, member_dim, minimum=2)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    variance = forecast.var(member_dim, ddof=1, skipna=False)
    return annotate(np.sqrt(weighted_mean(variance, reduce_dims)), reduce_dims, metric="spread (sqrt of mean variance, ddof=1)")


def mean_variance_and_mse(
    forecast: xr.DataArray, truth: xr.DataArray, member_dim: Hashable, reduce_dims: Sequence[Hashable]
) -> tuple[xr.DataArray, xr.DataArray]:
    """(mean unbiased ensemble variance, mean squared ensemble-mean error) over the same valid points.

    A NaN in either drops the point from both averages, so the two stay comparable.
    """
    variance = forecast.var(member_dim, ddof=1, skipna=False)
    error2 = (forecast.mean(member_dim, skipna=False) - truth) ** 2
    valid = variance.notnull() & error2.notnull()
    return weighted_mean(variance.where(valid), reduce_dims), weighted_mean(error2.where(valid), reduce_dims)


def spread_skill_ratio(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    corrected: bool = True,
) -> xr.DataArray:
    """Spread / ensemble-mean RMSE (dimensionless), 1 for a calibrated ensemble when ``corrected``.

    ``corrected=True`` multiplies by sqrt((M+1)/M), the finite-ensemble factor of the calibration
    identity E[(ȳ − y)²] = (M+1)/M E[s²]; ``False`` gives the raw ratio. The attrs say which.
    """
    size = require_members(forecast, member_dim, minimum=2)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    variance, error2 = mean_variance_and_mse(forecast, truth, member_dim, reduce_dims)
    ratio = np.sqrt(variance / error2)
    factor = np.sqrt((size + 1) / size) if corrected else 1.0
    return annotate(
        ratio * factor,
        reduce_dims,
        metric="spread-skill ratio",
        correction="multiplied by sqrt((M+1)/M)" if corrected else "none (raw spread / RMSE)",
    )


def _uniform_like(template: xr.DataArray, seed: int) -> xr.DataArray:
    """Uniform [0, 1) draws shaped and chunked like ``template``, reproducible from ``seed``."""
    if template.chunks:
        data = dask.array.random.default_rng(seed).random(template.shape, chunks=template.chunks)
    else:
        data = np.random.default_rng(seed).random(template.shape)
    return template.copy(data=data)


def _rank_kernel(x: np.ndarray, y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rank 0..M of the truth among the members (last axis), ties split by ``u``; −1 where NaN."""
    yv = y[..., None]
    below = (x < yv).sum(axis=-1)
    ties = (x == yv).sum(axis=-1)
    rank = below + np.floor(u * (ties + 1)).astype(np.int64)
    return np.where(np.isnan(y) | np.isnan(x).any(axis=-1), -1, rank)


def _binned_sum(
    index: xr.DataArray,
    n_bins: int,
    bin_dim: str,
    dims: Sequence[Hashable],
    mask: xr.DataArray | None = None,
    weighted: bool = True,
) -> xr.DataArray:
    """Σ over ``dims`` of [index == b] (and ``mask``) for b = 0..n_bins−1, cell-area weighted if asked.

    The one-hot intermediate is boolean (n_bins bytes per point and chunk) and is counted over the
    other dims before the latitude weights are applied to the much smaller counts.
    """
    bins = xr.DataArray(np.arange(n_bins), dims=(bin_dim,), coords={bin_dim: np.arange(n_bins)})
    onehot = index == bins
    if mask is not None:
        onehot = onehot & mask
    counts = onehot.sum([d for d in dims if d != "latitude"])
    if "latitude" not in dims:
        return counts
    return weighted_sum(counts, ["latitude"]) if weighted else counts.sum("latitude")


def rank_histogram(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    seed: int = 0,
    weighted: bool = True,
    normalize: bool = True,
) -> xr.DataArray:
    """Rank histogram with M+1 bins (new dim ``rank``, 0..M), summed over ``dims``.

    The rank is the number of members below the truth plus a uniform draw from 0..(number of members
    equal to it), from a generator seeded by ``seed`` (identical draws for identical chunking).
    Points with a NaN member or truth are left out. ``weighted`` uses cell-area weights when latitude
    is reduced; ``normalize`` divides by the total so the bins sum to 1, else they are (weighted) counts.
    """
    size = require_members(forecast, member_dim)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    forecast = whole_members(forecast, member_dim)
    template = xr.broadcast(forecast.isel({member_dim: 0}, drop=True), truth)[0]
    ranks = xr.apply_ufunc(
        _rank_kernel,
        forecast,
        truth,
        _uniform_like(template, seed),
        input_core_dims=[[member_dim], [], []],
        dask="parallelized",
        output_dtypes=[np.int64],
    )
    hist = _binned_sum(ranks, size + 1, "rank", reduce_dims, weighted=weighted)
    if normalize:
        hist = hist / hist.sum("rank")
    return annotate(hist.rename("rank_histogram"), reduce_dims, metric="rank histogram", tie_breaking=f"random, seed {seed}")


def as_threshold_array(thresholds: Sequence[float] | xr.DataArray, dim: str = "threshold") -> xr.DataArray:
    """Thresholds as a DataArray: a sequence of numbers becomes a 1-D array along ``dim``."""
    if isinstance(thresholds, xr.DataArray):
        return thresholds
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    return xr.DataArray(values, dims=(dim,), coords={dim: values})


def _exceedance(forecast: xr.DataArray, truth: xr.DataArray, thresholds: xr.DataArray, member_dim: Hashable) -> tuple[xr.DataArray, xr.DataArray]:
    """(number of members > threshold, truth > threshold as 0/1), both NaN where anything is NaN."""
    valid = forecast.notnull().all(member_dim) & truth.notnull()
    count = (forecast > thresholds).sum(member_dim).where(valid)
    observed = (truth > thresholds).astype(np.float64).where(valid)
    return count, observed


def brier_score(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    thresholds: Sequence[float] | xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    fair: bool = False,
) -> xr.DataArray:
    """Brier score of the event "value > threshold" for each threshold, averaged over ``dims``.

    The forecast probability is the member fraction p. ``fair=True`` gives Ferro's (2014) fair Brier
    score (p − o)² − p(1 − p)/(M − 1), unbiased for the infinite-ensemble score. ``thresholds`` is a
    sequence of values (new dim ``threshold``) or a DataArray that broadcasts against the truth (e.g.
    per-point climatological quantiles with a ``quantile`` dim).
    """
    size = require_members(forecast, member_dim, minimum=2 if fair else 1)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    count, observed = _exceedance(forecast, truth, as_threshold_array(thresholds), member_dim)
    p = count / size
    score = (p - observed) ** 2
    if fair:
        score = score - p * (1.0 - p) / (size - 1)
    return annotate(weighted_mean(score, reduce_dims), reduce_dims, metric="fair Brier score" if fair else "Brier score", event="value > threshold")


def reliability(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    thresholds: Sequence[float] | xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
) -> xr.Dataset:
    """Reliability-diagram data for "value > threshold", one bin per forecast probability k/M.

    Returns ``forecast_probability`` (k/M), ``observed_frequency`` (the weighted event frequency of the
    cases in the bin, NaN for empty bins) and ``bin_fraction`` (their weighted share of all cases),
    along dim ``probability_bin`` (k = 0..M).
    """
    size = require_members(forecast, member_dim)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    count, observed = _exceedance(forecast, truth, as_threshold_array(thresholds), member_dim)
    cases = _binned_sum(count, size + 1, "probability_bin", reduce_dims)
    events = _binned_sum(count, size + 1, "probability_bin", reduce_dims, mask=observed == 1)
    out = xr.Dataset(
        {
            "observed_frequency": events / cases.where(cases > 0),
            "bin_fraction": cases / cases.sum("probability_bin"),
        },
        coords={"forecast_probability": ("probability_bin", np.arange(size + 1) / size)},
    )
    return annotate(out, reduce_dims, metric="reliability diagram", event="value > threshold")


def energy_score_numpy(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, fair: bool = True) -> np.ndarray:
    """Energy score with the weighted norm ‖v‖ = sqrt(Σ_d w_d v_d²).

    forecast (..., M, D), truth (..., D), weights (D,) → (...). Pairwise distances come from the Gram
    matrix of the centred members: O(M² + M·D) memory per vector, never O(M²·D).
    """
    root = np.sqrt(weights)
    x = np.asarray(forecast, dtype=np.float64) * root
    y = np.asarray(truth, dtype=np.float64) * root
    m = x.shape[-2]
    skill = np.sqrt(((x - y[..., None, :]) ** 2).sum(axis=-1)).mean(axis=-1)
    xc = x - x.mean(axis=-2, keepdims=True)
    # einsum, not `@`: no BLAS threads, which would oversubscribe the cores inside dask's own threads.
    gram = np.einsum("...id,...jd->...ij", xc, xc)
    norms = np.einsum("...ii->...i", gram)
    dist2 = norms[..., :, None] + norms[..., None, :] - 2.0 * gram
    pair_sum = np.sqrt(np.clip(dist2, 0.0, None)).sum(axis=(-1, -2))
    return skill - pair_sum / (2.0 * m * (m - 1) if fair else 2.0 * m * m)


def energy_score(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    member_dim: Hashable = "number",
    vector_dims: Sequence[Hashable] = ("latitude", "longitude"),
    dims: Sequence[Hashable] | None = None,
    fair: bool = True,
) -> xr.DataArray:
    """Energy score of the multivariate vector spanned by ``vector_dims``, averaged over ``dims``.

    ES = mean_i‖x_i − y‖ − Σ_{i,j}‖x_i − x_j‖ / (2M(M−1)) (fair; 2M² if not). The norm is Euclidean,
    with cell-area weights (mean 1) when latitude is a vector dim. The vector dims must be whole in
    dask; ``dims`` defaults to the default reduction dims that are not vector dims (i.e. time).
    """
    require_members(forecast, member_dim, minimum=2 if fair else 1)
    vector_dims = tuple(vector_dims)
    missing = [d for d in vector_dims if d not in forecast.dims]
    if missing:
        raise BdlensError(f"energy score vector dims {missing} are not dimensions of the forecast {tuple(forecast.dims)}")
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim, *vector_dims))
    weights = xr.DataArray(
        np.ones([forecast.sizes[d] for d in vector_dims]),
        dims=vector_dims,
        coords={d: forecast[d].values for d in vector_dims if d in forecast.coords},
    )
    if "latitude" in vector_dims:
        weights = weights * lat_weights(forecast["latitude"])
    stacked_dim = "_energy_vector"
    if forecast.chunks:
        forecast = forecast.chunk({member_dim: -1, **{d: -1 for d in vector_dims}})
    if truth.chunks:
        truth = truth.chunk({d: -1 for d in vector_dims})
    pointwise = xr.apply_ufunc(
        energy_score_numpy,
        forecast.stack({stacked_dim: vector_dims}),
        truth.stack({stacked_dim: vector_dims}),
        weights.stack({stacked_dim: vector_dims}),
        input_core_dims=[[member_dim, stacked_dim], [stacked_dim], [stacked_dim]],
        kwargs={"fair": fair},
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    return annotate(
        weighted_mean(pointwise, reduce_dims),
        reduce_dims,
        metric="fair energy score" if fair else "energy score",
        vector_dims=", ".join(map(str, vector_dims)),
    )

