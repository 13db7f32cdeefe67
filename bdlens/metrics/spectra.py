"""Zonal power spectra of ensemble members and of the truth (docs/science.md §7).

Members that are too smooth (lost small-scale power, as blurry ensemble means or under-dispersive
generative models show) are visible as a spectrum that falls below the truth's at high wavenumbers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr

from bdlens.metrics.weighting import annotate, require_members, resolve_dims, weighted_mean


def _one_sided_power(x: np.ndarray) -> np.ndarray:
    """One-sided power along the last axis (length N) → (..., N//2 + 1); sums to the mean of x²."""
    n = x.shape[-1]
    power = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64), axis=-1)) ** 2 / n**2
    # Wavenumbers 1..N/2−1 stand for ±k, so they carry both halves; 0 and (even-N) Nyquist do not.
    last = -1 if n % 2 == 0 else None
    power[..., 1:last] *= 2.0
    return power


def zonal_power_spectrum(field: xr.DataArray, dim: Hashable = "longitude") -> xr.DataArray:
    """Power per zonal wavenumber (units²), along new dim ``zonal_wavenumber`` replacing ``dim``.

    Normalised so that the sum over wavenumbers equals the zonal mean of field² (Parseval). ``dim``
    must be a whole dask chunk; all other dimensions are kept.
    """
    n = field.sizes[dim]
    if field.chunks:
        field = field.chunk({dim: -1})
    spectrum = xr.apply_ufunc(
        _one_sided_power,
        field,
        input_core_dims=[[dim]],
        output_core_dims=[["zonal_wavenumber"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"zonal_wavenumber": n // 2 + 1}},
    )
    return spectrum.assign_coords(zonal_wavenumber=np.arange(n // 2 + 1))


def zonal_spectra(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    member_dim: Hashable = "number",
    dims: Sequence[Hashable] | None = None,
) -> xr.Dataset:
    """Zonal power spectra of the members (averaged over members) and of the truth.

    Both are averaged over ``dims`` (default time and latitude, cell-area weighted; longitude is the
    transform dimension and cannot be reduced). Returns ``forecast`` and ``truth`` along
    ``zonal_wavenumber``; points where the truth is NaN are left out of both.
    """
    require_members(forecast, member_dim)
    reduce_dims = resolve_dims(forecast, dims, exclude=(member_dim, "longitude"))
    valid = truth.notnull().all("longitude") & forecast.notnull().all(("longitude", member_dim))
    members = zonal_power_spectrum(forecast).mean(member_dim).where(valid)
    observed = zonal_power_spectrum(truth).where(valid)
    out = xr.Dataset({"forecast": weighted_mean(members, reduce_dims), "truth": weighted_mean(observed, reduce_dims)})
    return annotate(out, reduce_dims, metric="zonal power spectrum (sum over wavenumbers = zonal mean of x^2)")
