"""The analysis-error model of the demo world (docs/science.md §2).

An analysis is the truth plus an error δ drawn from a balanced, spatially correlated Gaussian model
defined in the dynamical core's spectral space:

1. **Stream function** ψ′: an isotropic Gaussian random field on each sigma layer with spectrum
   ∝ exp(−κ n(n+1)/2), κ = ½(L/a)² (correlation length L, Earth radius a), correlated between
   layers as exp(−½(Δ ln σ / h)²) with h = ``vertical_length_log_sigma``: smooth in the vertical, so
   the hydrostatic temperature error below stays bounded however close the layers are. The wind error is purely rotational
   (vorticity′ = ∇²ψ′, divergence′ = 0): analyses are close to non-divergent at large scales.
2. **Mass field in linear (geostrophic) balance**: geopotential error Φ′ = f ψ′ with f = 2Ω sin φ,
   so mass errors vanish at the equator, as in the balance operators of variational data assimilation.
3. **Hydrostatic temperature**: T′ = −(1/R) ∂Φ′/∂ln σ (finite differences between layers), and the
   surface-pressure error from the lowest layer, ln p_s′ = Φ′_bottom / (R T_ref).

The amplitude is set so that the grid-point std of the wind error is ``wind_std_ms``. Draw number
(stream, i, j …) is keyed by a numpy ``SeedSequence``, so any draw is reproducible on its own,
whatever else was drawn before it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bdlens.grid import EARTH_RADIUS_M
from bdlens.world.config import AnalysisErrorConfig
from bdlens.world.dycore import STATE_FIELDS, HeldSuarezCore

# Streams of independent random numbers derived from the world seed.
ANALYSIS_STREAM = 1
ENSEMBLE_STREAM = 2
_CALIBRATION_DRAWS = 16


class BalancedAnalysisError:
    """Draws analysis-error perturbations δ as model-state arrays (see the module docstring)."""

    def __init__(self, core: HeldSuarezCore, config: AnalysisErrorConfig, seed: int):
        self.core = core
        self.config = config
        self.seed = seed
        grid = core.coords.horizontal
        _, total_wavenumber = np.meshgrid(*grid.modal_axes, indexing="ij")
        kappa = 0.5 * (config.correlation_length_km * 1e3 / EARTH_RADIUS_M) ** 2
        self._spectrum = np.exp(-kappa * total_wavenumber * (total_wavenumber + 1) / 2) * grid.mask
        log_sigma = np.log(core.coords.vertical.centers)
        corr = np.exp(-0.5 * ((log_sigma[:, None] - log_sigma[None, :]) / config.vertical_length_log_sigma) ** 2)
        # A Gaussian correlation matrix is near-singular: take its symmetric square root with the
        # tiny negative eigenvalues of round-off clipped, rather than a Cholesky factor.
        eigval, eigvec = np.linalg.eigh(corr)
        self._vertical = eigvec @ np.diag(np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
        _, sin_lat = grid.nodal_mesh
        self._coriolis = 2.0 * core.specs.angular_velocity * sin_lat  # (lon, lat), non-dimensional
        self._log_sigma = log_sigma
        self._amplitude = 1.0
        # Calibrate the amplitude on a fixed set of draws (stream −1) to hit the target wind std.
        winds = [self._wind_std(self._unit_draw(np.random.default_rng([seed, 2**31 - 1, k]))) for k in range(_CALIBRATION_DRAWS)]
        target = core.specs.nondimensionalize(config.wind_std_ms * core.units.m / core.units.s)
        self._amplitude = float(target / np.sqrt(np.mean(np.square(winds))))

    def _unit_draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        grid = self.core.coords.horizontal
        white = rng.standard_normal((self.core.coords.vertical.layers, *self._spectrum.shape))
        psi = self._amplitude * np.einsum("ij,jmn->imn", self._vertical, white) * self._spectrum
        phi = np.asarray(grid.to_modal(self._coriolis * np.asarray(grid.to_nodal(psi))))
        temperature = -np.gradient(phi, self._log_sigma, axis=0) / self.core.specs.R
        log_ps = phi[-1:] / (self.core.specs.R * self.core.reference_temperature[-1])
        return {
            "vorticity": np.asarray(grid.laplacian(psi)),
            "divergence": np.zeros_like(psi),
            "temperature_variation": temperature,
            "log_surface_pressure": log_ps,
        }

    def _wind_std(self, draw: dict[str, np.ndarray]) -> float:
        from dinosaur import spherical_harmonic

        grid = self.core.coords.horizontal
        u, v = spherical_harmonic.vor_div_to_uv_nodal(grid, draw["vorticity"], draw["divergence"])
        area = np.asarray(grid.cos_lat) / np.mean(np.asarray(grid.cos_lat))  # area weights on the Gauss grid
        return float(np.sqrt(np.mean((np.asarray(u) ** 2 + np.asarray(v) ** 2) / 2 * area)))

    def draw(self, *key: int) -> dict[str, np.ndarray]:
        """One perturbation δ for ``key`` (e.g. ``(ANALYSIS_STREAM, time_index)``), float32 arrays."""
        rng = np.random.default_rng([self.seed, *key])
        return {k: v.astype(np.float32) for k, v in self._unit_draw(rng).items()}

    def perturb(self, state_arrays: dict[str, np.ndarray], *key: int) -> dict[str, np.ndarray]:
        """``state + δ(key)`` for model-state arrays of one time."""
        delta = self.draw(*key)
        return {name: state_arrays[name] + delta[name] for name in STATE_FIELDS}


def perturb_batch(error: BalancedAnalysisError, states: dict[str, np.ndarray], keys: list[tuple[int, ...]]) -> dict[str, Any]:
    """Perturb a batch of states (leading axis = batch) with one key per batch entry."""
    perturbed = [error.perturb({k: v[i] for k, v in states.items()}, *key) for i, key in enumerate(keys)]
    return {name: np.stack([p[name] for p in perturbed]) for name in STATE_FIELDS}
