"""The demo world's dynamical core: a dry Held–Suarez atmosphere from ``dinosaur`` (JAX, CPU).

This module is the only place that talks to dinosaur. It integrates the spectral primitive equations
on sigma levels and diagnoses WB2-layout fields: the spectral state is synthesised directly on the
WB2 64×32 equiangular grid (exact spectral evaluation, no horizontal interpolation), then interpolated
from sigma to pressure levels.

Surface stand-ins (documented in the dataset attributes): the planet is flat, so surface pressure *is*
mean-sea-level pressure; ``2m_temperature`` and the ``10m`` winds are the lowest sigma layer's values.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from bdlens.world.config import WorldConfig

# 64×32 equiangular output (WB2 5.625°): fixed by docs/science.md §1 for the demo world.
OUTPUT_NLON, OUTPUT_NLAT = 64, 32
STATE_FIELDS = ("vorticity", "divergence", "temperature_variation", "log_surface_pressure")


def _jax_modules() -> Any:
    """Import dinosaur lazily: it is an optional extra (``bdlens[world]``)."""
    try:
        import jax  # noqa: F401
        from dinosaur import (
            coordinate_systems,
            held_suarez,
            primitive_equations,
            primitive_equations_states,
            scales,
            sigma_coordinates,
            spherical_harmonic,
            time_integration,
            vertical_interpolation,
            xarray_utils,
        )
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        from bdlens.errors import BdlensError

        raise BdlensError(
            "the demo world needs the dynamical core: install it with `pip install -e '.[world]'`"
        ) from err
    return locals()


class HeldSuarezCore:
    """Spectral Held–Suarez model at the configured truncation and sigma layers.

    Model states are dinosaur ``State`` pytrees in non-dimensional units; ``to_arrays`` /
    ``from_arrays`` convert them to plain float32 numpy dicts for storage.
    """

    def __init__(self, config: WorldConfig):
        m = _jax_modules()
        self._m = m
        import jax

        self.config = config
        units = m["scales"].units
        self.units = units
        grid = {21: m["spherical_harmonic"].Grid.T21, 31: m["spherical_harmonic"].Grid.T31, 42: m["spherical_harmonic"].Grid.T42}[
            config.truncation
        ]()
        self.coords = m["coordinate_systems"].CoordinateSystem(
            grid, m["sigma_coordinates"].SigmaCoordinates.equidistant(config.layers)
        )
        self.specs = m["primitive_equations"].PrimitiveEquationsSpecs.from_si()
        self._init_fn, aux = m["primitive_equations_states"].isothermal_rest_atmosphere(
            self.coords, self.specs, p0=1e5 * units.pascal, p1=5e3 * units.pascal
        )
        self.reference_temperature = np.asarray(aux[m["xarray_utils"].REF_TEMP_KEY])
        self.nodal_orography = np.asarray(aux[m["xarray_utils"].OROGRAPHY])
        equations = m["time_integration"].compose_equations(
            [
                m["primitive_equations"].PrimitiveEquations(
                    self.reference_temperature, grid.to_modal(self.nodal_orography), self.coords, self.specs
                ),
                m["held_suarez"].HeldSuarezForcingSigma(self.coords, self.specs, self.reference_temperature),
            ]
        )
        dt = self.specs.nondimensionalize(config.time_step_minutes * units.minute)
        step = m["time_integration"].imex_rk_sil3(equations, dt)
        # Scale-selective damping of the highest wavenumbers, as in dinosaur's Held–Suarez setup.
        hyperdiffusion = m["time_integration"].exponential_step_filter(grid, dt, tau=0.0087504, order=1.5, cutoff=0.8)
        self._step = m["time_integration"].step_with_filters(step, [hyperdiffusion])
        self.steps_per_output = int(round(config.output_hours * 60 / config.time_step_minutes))
        self.output_grid = m["spherical_harmonic"].Grid(
            longitude_wavenumbers=grid.longitude_wavenumbers,
            total_wavenumbers=grid.total_wavenumbers,
            longitude_nodes=OUTPUT_NLON,
            latitude_nodes=OUTPUT_NLAT,
            latitude_spacing="equiangular",
        )
        self.latitudes = np.rad2deg(np.asarray(self.output_grid.latitudes))
        self.longitudes = np.rad2deg(np.asarray(self.output_grid.longitudes))
        self.levels = np.asarray(config.levels)
        pa = self.specs.nondimensionalize(1.0 * units.pascal)
        self._pressure_coords = m["vertical_interpolation"].PressureCoordinates(self.levels * 100.0 * pa)
        self._diagnose_batch = jax.jit(jax.vmap(self._diagnose_one))
        self._jax = jax

    # --- state handling -------------------------------------------------------------------------
    def rest_state(self, seed: int) -> Any:
        """An isothermal atmosphere at rest with small seeded surface-pressure noise (spin-up start)."""
        return self._init_fn(rng_key=self._jax.random.PRNGKey(seed))

    @staticmethod
    def to_arrays(state: Any) -> dict[str, np.ndarray]:
        """Model state (possibly with leading batch/time axes) → dict of float32 numpy arrays."""
        return {name: np.asarray(getattr(state, name), dtype=np.float32) for name in STATE_FIELDS}

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> Any:
        """Inverse of :meth:`to_arrays`."""
        import jax.numpy as jnp

        return self._m["primitive_equations"].State(**{name: jnp.asarray(arrays[name]) for name in STATE_FIELDS})

    # --- integration ------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=8)  # noqa: B019 - one compiled function per trajectory length
    def _trajectory_fn(self, n_outputs: int, batched: bool) -> Any:
        fn = self._m["time_integration"].trajectory_from_step(
            self._step, outer_steps=n_outputs, inner_steps=self.steps_per_output, start_with_input=True
        )
        return self._jax.jit(self._jax.vmap(fn) if batched else fn)

    def trajectory(self, state: Any, n_outputs: int, batched: bool = False) -> tuple[Any, Any]:
        """Integrate ``n_outputs`` output intervals.

        Returns ``(final_state, frames)`` where ``frames`` stacks the states at output times
        0 … n_outputs−1 (the input state first) along a new leading axis (after the batch axis when
        ``batched``), and ``final_state`` is at output time ``n_outputs``.
        """
        return self._trajectory_fn(n_outputs, batched)(state)

    def advance(self, state: Any, n_outputs: int) -> Any:
        """The state ``n_outputs`` output intervals later (no frames kept)."""
        final, _ = self.trajectory(state, n_outputs)
        return final

    # --- diagnostics ------------------------------------------------------------------------------
    def _diagnose_one(self, state: Any) -> dict[str, Any]:
        m, grid, specs = self._m, self.output_grid, self.specs
        import jax.numpy as jnp

        temperature = self.reference_temperature[:, None, None] + grid.to_nodal(state.temperature_variation)
        u, v = m["spherical_harmonic"].vor_div_to_uv_nodal(grid, state.vorticity, state.divergence)
        surface_pressure = jnp.exp(grid.to_nodal(state.log_surface_pressure))  # (1, lon, lat)
        geopotential = m["primitive_equations"].get_geopotential_on_sigma(
            temperature,
            nodal_orography=jnp.zeros((OUTPUT_NLON, OUTPUT_NLAT)),
            sigma=self.coords.vertical,
            gravity_acceleration=specs.g,
            ideal_gas_constant=specs.R,
        )
        on_sigma = {"geopotential": geopotential, "temperature": temperature, "u_component_of_wind": u, "v_component_of_wind": v}
        on_pressure = m["vertical_interpolation"].interp_sigma_to_pressure(
            on_sigma, self._pressure_coords, self.coords.vertical, surface_pressure
        )
        surface = {
            "mean_sea_level_pressure": surface_pressure[0],
            "2m_temperature": temperature[-1],
            "10m_u_component_of_wind": u[-1],
            "10m_v_component_of_wind": v[-1],
        }
        return {**on_pressure, **surface}

    def diagnose(self, frames: Any) -> dict[str, np.ndarray]:
        """WB2 fields in SI units from stacked states (leading axis = time).

        Returns upper-air arrays of shape (time, level, lat, lon) and surface arrays (time, lat, lon),
        latitude ascending, longitude from 0°.
        """
        raw = self._diagnose_batch(frames)
        u = self.units
        scale = {
            "geopotential": self.specs.dimensionalize(1.0, u.m**2 / u.s**2).magnitude,
            "temperature": self.specs.dimensionalize(1.0, u.degK).magnitude,
            "u_component_of_wind": self.specs.dimensionalize(1.0, u.m / u.s).magnitude,
            "v_component_of_wind": self.specs.dimensionalize(1.0, u.m / u.s).magnitude,
            "mean_sea_level_pressure": self.specs.dimensionalize(1.0, u.pascal).magnitude,
        }
        scale["2m_temperature"] = scale["temperature"]
        scale["10m_u_component_of_wind"] = scale["10m_v_component_of_wind"] = scale["u_component_of_wind"]
        # dinosaur's nodal layout is (..., lon, lat); WB2's is (..., lat, lon).
        return {name: (np.asarray(arr) * scale[name]).swapaxes(-1, -2).astype(np.float32) for name, arr in raw.items()}
