"""Grids and conventions shared by every stage (docs/science.md §1).

Canonical layout: latitude **ascending** (south → north), longitude in [0, 360) ascending, level in
hPa ascending (50 … 1000), WeatherBench2 long variable names, SI units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WB2_LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)

UPPER_AIR_VARIABLES: tuple[str, ...] = (
    "geopotential",
    "temperature",
    "u_component_of_wind",
    "v_component_of_wind",
    "specific_humidity",
)
SURFACE_VARIABLES: tuple[str, ...] = (
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "mean_sea_level_pressure",
    "surface_pressure",
)

EARTH_RADIUS_M = 6_371_000.0

# CF attributes of the WB2 variables (SI units), for every writer of canonical datasets.
VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "geopotential": {"units": "m2 s-2", "standard_name": "geopotential", "long_name": "Geopotential"},
    "temperature": {"units": "K", "standard_name": "air_temperature", "long_name": "Temperature"},
    "u_component_of_wind": {"units": "m s-1", "standard_name": "eastward_wind", "long_name": "U component of wind"},
    "v_component_of_wind": {"units": "m s-1", "standard_name": "northward_wind", "long_name": "V component of wind"},
    "specific_humidity": {"units": "kg kg-1", "standard_name": "specific_humidity", "long_name": "Specific humidity"},
    "2m_temperature": {"units": "K", "standard_name": "air_temperature", "long_name": "2 metre temperature"},
    "10m_u_component_of_wind": {"units": "m s-1", "standard_name": "eastward_wind", "long_name": "10 metre U wind component"},
    "10m_v_component_of_wind": {"units": "m s-1", "standard_name": "northward_wind", "long_name": "10 metre V wind component"},
    "mean_sea_level_pressure": {
        "units": "Pa",
        "standard_name": "air_pressure_at_mean_sea_level",
        "long_name": "Mean sea level pressure",
    },
    "surface_pressure": {"units": "Pa", "standard_name": "surface_air_pressure", "long_name": "Surface pressure"},
    "land_sea_mask": {"units": "1", "standard_name": "land_binary_mask", "long_name": "Land-sea mask"},
    "geopotential_at_surface": {"units": "m2 s-2", "standard_name": "surface_geopotential", "long_name": "Geopotential at surface"},
}


@dataclass(frozen=True)
class Grid:
    """An equiangular latitude/longitude grid.

    ``nlon`` × ``nlat`` points; ``poles`` says whether the first/last latitude rows sit on the poles
    (240×121, 1440×721) or half a cell away from them (WB2 64×32).
    """

    name: str
    nlon: int
    nlat: int
    poles: bool

    @property
    def dlat(self) -> float:
        """Latitude spacing in degrees."""
        return 180.0 / (self.nlat - 1) if self.poles else 180.0 / self.nlat

    @property
    def dlon(self) -> float:
        """Longitude spacing in degrees."""
        return 360.0 / self.nlon

    def latitudes(self) -> np.ndarray:
        """Latitudes in degrees, ascending, shape (nlat,)."""
        if self.poles:
            return np.linspace(-90.0, 90.0, self.nlat)
        return -90.0 + self.dlat * (np.arange(self.nlat) + 0.5)

    def longitudes(self) -> np.ndarray:
        """Longitudes in degrees in [0, 360), ascending, shape (nlon,)."""
        return self.dlon * np.arange(self.nlon)


GRIDS: dict[str, Grid] = {
    "64x32": Grid("64x32", 64, 32, poles=False),
    "240x121": Grid("240x121", 240, 121, poles=True),
    "1440x721": Grid("1440x721", 1440, 721, poles=True),
}


def grid_from_coords(latitude: np.ndarray, longitude: np.ndarray, tol: float = 1e-6) -> Grid:
    """The supported :class:`Grid` that matches 1-D ascending latitude/longitude in degrees.

    Raises ``ValueError`` naming the sizes when no supported grid matches.
    """
    for grid in GRIDS.values():
        if (
            latitude.size == grid.nlat
            and longitude.size == grid.nlon
            and np.allclose(latitude, grid.latitudes(), atol=tol)
            and np.allclose(longitude, grid.longitudes(), atol=tol)
        ):
            return grid
    raise ValueError(
        f"grid {longitude.size}x{latitude.size} (lat {latitude.min():g}..{latitude.max():g}) is not one of the "
        f"supported equiangular grids {sorted(GRIDS)}; regrid it first"
    )


def lat_weights(latitude: np.ndarray) -> np.ndarray:
    """Cell-area latitude weights, normalised to mean 1, shape like ``latitude`` (degrees).

    w(φ) ∝ sin(φ + Δ/2) − sin(φ − Δ/2) with the cell edges clipped to ±90°, so pole rows of grids
    that include the poles get their (small, non-zero) polar-cap area rather than cos φ = 0.
    The spacing Δ is taken from the coordinates, which must be equally spaced.
    """
    lat = np.asarray(latitude, dtype=np.float64)
    if lat.ndim != 1 or lat.size < 2:
        raise ValueError("latitude must be a 1-D array with at least two values")
    spacing = np.diff(lat)
    if not np.allclose(spacing, spacing[0], rtol=1e-6, atol=1e-9):
        raise ValueError("latitude is not equally spaced; lat_weights needs an equiangular grid")
    half = abs(spacing[0]) / 2.0
    upper = np.deg2rad(np.clip(lat + half, -90.0, 90.0))
    lower = np.deg2rad(np.clip(lat - half, -90.0, 90.0))
    weights = np.sin(upper) - np.sin(lower)
    return weights / weights.mean()
