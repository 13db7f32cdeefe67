"""Ensemble CRPS, fair (default, WB2) and standard (empirical CDF), in O(M log M) (docs/science.md §7).

With the members sorted, x_(1) ≤ … ≤ x_(M), the pairwise term is
Σ_{i,j}|x_i − x_j| = 2 Σ_i (2i − M − 1) x_(i), so

    fair CRPS     = mean_i|x_i − y| − Σ_i (2i − M − 1) x_(i) / (M(M − 1))
    standard CRPS = mean_i|x_i − y| − Σ_i (2i − M − 1) x_(i) / M².

Hand-written rather than taken from properscoring / xskillscore / scores because none of them is
both fair-and-standard, dask-parallel with only the member dimension whole, and O(M) in memory per
point; a single in-place sort plus one matrix-vector product is also faster (benchmarks/bench_crps.py).

NaN policy: ``skipna=False`` (default) gives NaN at a point where the truth or any member is NaN;
``skipna=True`` drops NaN members at that point (M becomes the number of valid members, as in
properscoring and scores) and gives NaN where the truth is NaN or fewer than 2 (fair) / 1 (standard)
members are valid. Reductions then skip NaN points (see :mod:`bdlens.metrics.weighting`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial

import numpy as np
import xarray as xr

from bdlens.metrics.weighting import XArray, annotate, require_members, resolve_dims, weighted_mean, whole_members


def crps_ensemble_numpy(forecast: np.ndarray, truth: np.ndarray, fair: bool = True, skipna: bool = False) -> np.ndarray:
    """Pointwise CRPS of an ensemble on the last axis: forecast (..., M), truth (...) → (...) float64.

    Memory is one float64 copy of ``forecast`` (sorted in place, then reused for |x − y|).
    """
    xs = np.array(forecast, dtype=np.float64, order="C")
    xs.sort(axis=-1)  # NaNs sort to the end
    y = np.asarray(truth, dtype=np.float64)
    m = xs.shape[-1]
    # Coefficients (2i − M − 1), i = 1..M; they sum to zero, which keeps the weighted sum well
    # conditioned for large offsets such as geopotential.
    coef = 2.0 * np.arange(1, m + 1, dtype=np.float64) - m - 1.0
    # einsum, not `@`: no BLAS threads, which would oversubscribe the cores inside dask's own threads.
    dot_coef = partial(np.einsum, "...i,i->...")
    with np.errstate(invalid="ignore", divide="ignore"):
        if skipna:
            nan = np.isnan(xs)
            n_missing = nan.sum(axis=-1)
            n = m - n_missing
            xs[nan] = 0.0
            # For n valid members the coefficient of x_(i) is (2i − n − 1) = coef_i + (M − n).
            pair_sum = dot_coef(xs, coef) + n_missing * xs.sum(axis=-1)
            xs -= y[..., None]
            np.abs(xs, out=xs)
            # Each zeroed NaN slot contributed |0 − y|.
            abs_sum = xs.sum(axis=-1) - n_missing * np.abs(y)
        else:
            n = np.full(xs.shape[:-1], m)
            pair_sum = dot_coef(xs, coef)
            xs -= y[..., None]
            np.abs(xs, out=xs)
            abs_sum = xs.sum(axis=-1)
        spread = pair_sum / (n * (n - 1.0)) if fair else pair_sum / (n * n * 1.0)
        score = abs_sum / n - spread
    return np.where(n >= (2 if fair else 1), score, np.nan)


def crps(
    forecast: XArray,
    truth: XArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
    fair: bool = True,
    skipna: bool = False,
) -> XArray:
    """Ensemble CRPS averaged over ``dims`` (default time, latitude, longitude; ``()`` for pointwise).

    ``forecast`` has the member dimension plus any others; ``truth`` has none of the member dimension
    and broadcasts against it. Units are those of the variable. Lazy for dask inputs: only the member
    dimension is put in one chunk. ``fair=True`` is the WB2 fair CRPS, ``False`` the empirical-CDF one.
    """
    require_members(forecast, member_dim, minimum=2 if fair else 1)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim,))
    pointwise = xr.apply_ufunc(
        crps_ensemble_numpy,
        whole_members(forecast, member_dim),
        truth,
        input_core_dims=[[member_dim], []],
        kwargs={"fair": fair, "skipna": skipna},
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    return annotate(
        weighted_mean(pointwise, reduce_dims),
        reduce_dims,
        metric="fair CRPS" if fair else "standard (empirical-CDF) CRPS",
        ensemble_size=forecast.sizes[member_dim],
        nan_policy="NaN members dropped per point" if skipna else "NaN where truth or any member is NaN",
    )
