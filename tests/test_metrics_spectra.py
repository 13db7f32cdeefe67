"""Zonal power spectra: analytic sinusoids and Parseval's identity."""

from __future__ import annotations

import numpy as np
import xarray as xr

from bdlens import grid
from bdlens.metrics import zonal_power_spectrum, zonal_spectra


def _field(values: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> xr.DataArray:
    return xr.DataArray(values, dims=("time", "latitude", "longitude"), coords={"latitude": lat, "longitude": lon})


def test_sinusoid_puts_its_power_at_its_wavenumber():
    g = grid.GRIDS["64x32"]
    lam = np.deg2rad(g.longitudes())
    field = 3.0 + 2.0 * np.cos(5 * lam + 0.4)
    spectrum = zonal_power_spectrum(_field(field[None, None, :], g.longitudes(), g.latitudes()[:1])).squeeze()
    expected = np.zeros(g.nlon // 2 + 1)
    expected[0], expected[5] = 9.0, 2.0  # mean², amplitude²/2
    np.testing.assert_allclose(spectrum.values, expected, atol=1e-12)


def test_parseval_and_member_average():
    rng = np.random.default_rng(0)
    g = grid.GRIDS["64x32"]
    lat, lon = g.latitudes()[::8], g.longitudes()
    truth = _field(rng.normal(size=(3, lat.size, lon.size)), lon, lat)
    members = xr.concat([truth * 0.5, truth * 1.5], dim="number")
    np.testing.assert_allclose(zonal_power_spectrum(truth).sum("zonal_wavenumber"), (truth**2).mean("longitude"), rtol=1e-12)
    out = zonal_spectra(members, truth)
    # Power is quadratic: the member average of (0.5² + 1.5²)/2 = 1.25 times the truth's.
    np.testing.assert_allclose(out.forecast.values, 1.25 * out.truth.values, rtol=1e-12)
    assert out.forecast.dims == ("zonal_wavenumber",)
    lazy = zonal_spectra(members.chunk({"time": 1}), truth.chunk({"time": 1}))
    np.testing.assert_allclose(lazy.forecast.values, out.forecast.values, rtol=1e-12)
