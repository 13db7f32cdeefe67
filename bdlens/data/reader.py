"""Open WeatherBench2 / ERA5-layout files and return them in the canonical bdlens layout (docs/science.md §1).

Canonical layout: dims named ``time``, ``level``, ``latitude``, ``longitude`` (and ``number``,
``prediction_timedelta`` for forecasts), latitude **ascending** (south → north), longitude in
[0, 360) ascending, level in hPa ascending, WB2 long variable names, coordinates snapped to the exact
values of one of the supported grids (:data:`bdlens.grid.GRIDS`). Every change made to reach that
layout is logged at INFO level; nothing is flipped silently.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.grid import Grid, grid_from_coords

log = logging.getLogger(__name__)

#: Dimension names of the canonical layout, in canonical order.
CANONICAL_DIMS: tuple[str, ...] = ("number", "time", "prediction_timedelta", "level", "latitude", "longitude")

#: Alias dimension/coordinate names found in ERA5 (CDS), CMIP and other files → canonical name.
DIM_ALIASES: dict[str, str] = {
    "lat": "latitude",
    "lon": "longitude",
    "plev": "level",
    "pressure_level": "level",
    "isobaricInhPa": "level",
    "valid_time": "time",
    "member": "number",  # WB2's and CF's usual names of the ensemble member dimension
    "realization": "number",
}

#: ERA5 short variable names → WB2 long names (renamed only when the long name is not present).
VARIABLE_ALIASES: dict[str, str] = {
    "z": "geopotential",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "t2m": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "sp": "surface_pressure",
    "lsm": "land_sea_mask",
}

_NETCDF_SUFFIXES = {".nc", ".nc4", ".netcdf", ".h5", ".hdf5"}
# Levels are in the units their attribute says; without one, levels above this can only be in Pa
# (the highest WB2 level is 1000 hPa).
_MAX_HPA = 1100.0
_HPA_UNITS = {"hPa", "hectopascal", "hectopascals", "millibar", "millibars", "mbar", "mb"}
_PA_UNITS = {"Pa", "pascal", "pascals"}


def open_dataset(
    path: str | Path,
    variables: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    member_dim: str = "number",
    sparse_times: bool = False,
) -> xr.Dataset:
    """Open a WB2/ERA5-layout zarr store (v2 or v3) or netCDF file lazily (dask) in canonical layout.

    ``variables``: WB2 names to keep (default: all data variables). ``levels``: pressure levels in
    hPa to keep (default: all). ``member_dim``: the file's ensemble member dimension, renamed to
    ``number`` (``member`` and ``realization`` are recognised anyway). Returns a Dataset whose arrays are dask-backed, dims among
    (number, time, prediction_timedelta, level, latitude, longitude) in that order, on one of the
    supported grids. Raises :class:`BdlensError` naming the file and the problem for a missing path,
    variable or level, an unknown dimension, an unsupported or irregular grid, or an irregular
    time axis, for a zarr store with missing chunks or array metadata (zarr would silently read
    fill values), and for units it cannot convert (geopotential height in m is converted with
    g = 9.80665 m/s², levels in Pa to hPa). Missing time steps (gaps on a regular axis) are logged,
    not raised: the torch dataset decides whether its step Δ can live with them (``sparse_times``: a
    set of states with gaps by design, e.g. analyses to start forecasts from; logged at INFO).
    """
    path = Path(path)
    if not path.exists():
        raise BdlensError(f"{path}: no such file or directory; check the path (build the demo world with `bdlens world build`)")
    ds = _open_raw(path)
    if member_dim != "number" and member_dim in ds.dims:
        ds = ds.rename({member_dim: "number"})
    ds = _rename_aliases(ds, path)
    ds = _select_variables(ds, variables, path)
    ds = _geopotential_si(ds, path)
    _check_dims(ds, path)
    ds = _canonical_level(ds, levels, path)
    ds = _canonical_horizontal(ds, path)
    ds = _canonical_time(ds, path, sparse_times)
    return ds.transpose(*CANONICAL_DIMS, ..., missing_dims="ignore")


def _open_raw(path: Path) -> xr.Dataset:
    is_zarr = path.is_dir() or path.suffix == ".zarr"
    try:
        if is_zarr:
            # consolidated=None: use consolidated metadata when the store has it (usual for v2), else read
            # the tree (usual for v3, which has no consolidated metadata in its spec), without a warning.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
                ds = xr.open_zarr(path, chunks={}, consolidated=None)
        elif path.suffix.lower() in _NETCDF_SUFFIXES or path.is_file():
            return xr.open_dataset(path, chunks="auto")
        else:
            raise BdlensError(f"{path}: not a zarr store or netCDF file; pass a .zarr directory or a .nc file")
    except BdlensError:
        raise
    except Exception as err:  # the backends raise many types; all mean "not a readable dataset"
        kind = "zarr store" if is_zarr else "netCDF file"
        raise BdlensError(f"{path}: cannot be read as a {kind} ({type(err).__name__}: {err}); check the file is complete") from err
    check_zarr_complete(path)
    return ds


def check_zarr_complete(path: str | Path) -> None:
    """Raise :class:`BdlensError` naming every array of the zarr store ``path`` whose metadata file or
    chunks are missing: zarr reads an absent chunk as the fill value, so a lost file would otherwise
    become a silently smaller or different result. Lists the store; reads no chunk.

    Writers skip chunks that equal a finite fill value (zarr's ``write_empty_chunks=False``), so an
    absent chunk of such an array is logged, not raised. An integer or boolean array without a fill
    value (xarray's coordinates, e.g. ``number``) has zarr's default 0 / False, and zarr-python 3 skips
    chunks equal to it too (the ``number = [0]`` of a one-member forecast), so it is treated alike.
    With a NaN fill value (xarray's default for floats) no writer skips a chunk, and it is an error."""
    import zarr

    path = Path(path)
    problems = []
    group = zarr.open_group(path, mode="r")
    for name, array in group.arrays():
        if not any((path / name / meta).is_file() for meta in (".zarray", "zarr.json")):
            problems.append(f"{name} (array metadata missing)")
            continue
        missing = array.nchunks - array.nchunks_initialized
        if not missing:
            continue
        fill = array.fill_value
        if fill is None and array.dtype.kind in "iub":
            fill = array.dtype.type(0)
        if _finite_number(fill):
            log.info("%s: %s has %d of %d chunks absent, read as its fill value %s", path, name, missing, array.nchunks, fill)
        else:
            problems.append(f"{name} ({missing} of {array.nchunks} chunks missing)")
    if problems:
        raise BdlensError(f"{path}: incomplete zarr store: {'; '.join(problems)}; restore the missing files or rewrite the store")


def _finite_number(value: object) -> bool:
    try:
        return value is not None and bool(np.all(np.isfinite(value)))
    except TypeError:  # a string or structured fill value
        return False


@contextlib.contextmanager
def reading(source: str | Path) -> Iterator[None]:
    """Turn a failure to decode stored data (a truncated or corrupt chunk) into a one-line
    :class:`BdlensError` naming ``source``; bdlens's own errors pass through."""
    try:
        yield
    except BdlensError:
        raise
    except (RuntimeError, ValueError, OSError, zlib.error) as err:  # what the codecs raise for damaged bytes
        raise BdlensError(
            f"{source}: reading the data failed ({type(err).__name__}: {err}); a chunk may be truncated or corrupt, restore or rewrite the store"
        ) from err


#: Units of geopotential *height* (ECMWF's "gpm", CF's "m"), converted to geopotential with g.
_HEIGHT_UNITS = {"m", "gpm", "meter", "metre", "meters", "metres"}
_GEOPOTENTIAL_UNITS = {"m**2 s**-2", "m2 s-2", "m^2 s^-2", "m2/s2", "m^2/s^2", "m**2/s**2", "m2 s**-2"}
STANDARD_GRAVITY = 9.80665  # m/s², WMO; what ERA5 and WB2 use to convert geopotential and its height


def _geopotential_si(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Geopotential in m²/s², read from its ``units`` attribute: a height in metres is converted with
    g = 9.80665 m/s², other units are refused; no attribute means the WB2 convention (m²/s²)."""
    if "geopotential" not in ds.data_vars:
        return ds
    units = str(ds["geopotential"].attrs.get("units", "m**2 s**-2")).strip()
    if units.lower() in _HEIGHT_UNITS:
        log.info("%s: geopotential is a height in %s; converted to m**2 s**-2 with g = %s", path, units, STANDARD_GRAVITY)
        attrs = {**ds["geopotential"].attrs, "units": "m**2 s**-2"}
        return ds.assign(geopotential=(ds["geopotential"] * STANDARD_GRAVITY).assign_attrs(attrs))
    if units.replace(" ", "") not in {u.replace(" ", "") for u in _GEOPOTENTIAL_UNITS}:
        raise BdlensError(f"{path}: geopotential has units {units!r}; give it in m**2 s**-2 (geopotential) or m (geopotential height)")
    return ds


def _rename_aliases(ds: xr.Dataset, path: Path) -> xr.Dataset:
    names = set(ds.dims) | set(ds.coords) | set(ds.data_vars)
    renames = {old: new for old, new in DIM_ALIASES.items() if old in names and new not in names}
    renames |= {old: new for old, new in VARIABLE_ALIASES.items() if old in ds.data_vars and new not in names}
    if renames:
        log.info("%s: renamed %s to the WB2 names", path, ", ".join(f"{a}→{b}" for a, b in renames.items()))
        ds = ds.rename(renames)
    return ds


def _select_variables(ds: xr.Dataset, variables: Sequence[str] | None, path: Path) -> xr.Dataset:
    if variables is None:
        return ds
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise BdlensError(
            f"{path}: variable(s) {', '.join(missing)} not found; available: {', '.join(sorted(map(str, ds.data_vars)))}; "
            "request only available variables"
        )
    return ds[list(variables)]


def _check_dims(ds: xr.Dataset, path: Path) -> None:
    for name, da in ds.data_vars.items():
        unknown = [d for d in da.dims if d not in CANONICAL_DIMS]
        if unknown:
            raise BdlensError(
                f"{path}: variable {name} has unknown dimension(s) {', '.join(map(str, unknown))}; "
                f"expected dims among {', '.join(CANONICAL_DIMS)} (rename or drop the others)"
            )
        for needed in ("latitude", "longitude"):
            if needed not in da.dims:
                raise BdlensError(f"{path}: variable {name} has no {needed} dimension (dims {da.dims}); bdlens needs gridded fields")


def _canonical_level(ds: xr.Dataset, levels: Sequence[float] | None, path: Path) -> xr.Dataset:
    if "level" not in ds.dims:  # surface-only data: requested levels concern no variable here
        return ds
    values = ds["level"].values.astype(np.float64)
    units = str(ds["level"].attrs.get("units", "")).strip()
    if units and units not in _HPA_UNITS | _PA_UNITS:
        raise BdlensError(f"{path}: level has units {units!r}; give pressure levels in hPa or Pa")
    if units in _PA_UNITS or (not units and values.max() > _MAX_HPA):
        log.info("%s: level is in Pa%s; converted to hPa", path, "" if units else " (values above 1100 and no units)")
        ds = ds.assign_coords(level=("level", values / 100.0, {"units": "hPa", "long_name": "pressure level"}))
        values = values / 100.0
    if values.size > 1 and not np.all(np.diff(values) > 0):
        if np.unique(values).size != values.size:
            raise BdlensError(f"{path}: level coordinate has duplicate values {values.tolist()}; fix the file")
        log.info("%s: level was not ascending; sorted to ascending hPa", path)
        ds = ds.sortby("level")
    if levels is not None:
        available = ds["level"].values
        missing = [lev for lev in levels if not np.any(np.isclose(available, lev))]
        if missing:
            raise BdlensError(
                f"{path}: level(s) {', '.join(f'{m:g}' for m in missing)} hPa not found; available: "
                f"{', '.join(f'{a:g}' for a in available)} hPa; request only available levels"
            )
        ds = ds.sel(level=sorted(float(lev) for lev in levels), method="nearest")
    if np.allclose(ds["level"].values, np.round(ds["level"].values)):
        ds = ds.assign_coords(level=ds["level"].values.round().astype(np.int64))
    ds["level"].attrs.update(units="hPa", long_name="pressure level")
    return ds


def _canonical_horizontal(ds: xr.Dataset, path: Path) -> xr.Dataset:
    for name in ("latitude", "longitude"):
        if name not in ds.coords:
            raise BdlensError(f"{path}: no {name} coordinate; the file needs 1-D latitude/longitude coordinates in degrees")
        if ds[name].ndim != 1:
            raise BdlensError(f"{path}: {name} is not 1-D (a curvilinear grid); regrid to an equiangular grid first")
    lat = ds["latitude"].values.astype(np.float64)
    if lat.size > 1 and np.all(np.diff(lat) < 0):
        log.info("%s: latitude was descending (north→south); flipped to ascending", path)
        ds = ds.isel(latitude=slice(None, None, -1))
    lon = ds["longitude"].values.astype(np.float64)
    start = int(np.argmin(np.mod(lon, 360.0)))
    if lon.min() < 0.0 or start != 0:  # −180..180, or a 0..360 axis that starts elsewhere than 0°
        log.info("%s: longitude ran %g..%g; rolled to start at 0 in [0, 360)", path, lon[0], lon[-1])
        ds = ds.roll(longitude=-start, roll_coords=True)
        ds = ds.assign_coords(longitude=np.mod(ds["longitude"].values.astype(np.float64), 360.0))
    grid = _match_grid(ds["latitude"].values, ds["longitude"].values, path)
    # Snap to the exact grid values so files written in float32 or from a flipped grid align exactly.
    return ds.assign_coords(
        latitude=("latitude", grid.latitudes(), {"units": "degrees_north", "long_name": "latitude"}),
        longitude=("longitude", grid.longitudes(), {"units": "degrees_east", "long_name": "longitude"}),
    )


def _match_grid(lat: np.ndarray, lon: np.ndarray, path: Path) -> Grid:
    try:
        return grid_from_coords(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    except ValueError as err:
        raise BdlensError(f"{path}: {err}") from err


def _canonical_time(ds: xr.Dataset, path: Path, sparse_times: bool = False) -> xr.Dataset:
    if "time" not in ds.dims:
        return ds
    times = ds["time"].values
    if not np.issubdtype(times.dtype, np.datetime64):
        raise BdlensError(f"{path}: time coordinate is not a datetime (dtype {times.dtype}); fix its units/calendar attributes")
    if times.size > 1 and not np.all(np.diff(times) > np.timedelta64(0)):
        if np.unique(times).size != times.size:
            raise BdlensError(f"{path}: time coordinate has duplicate values; remove the duplicated times")
        log.info("%s: time was not ascending; sorted", path)
        ds = ds.sortby("time")
    step = time_step(ds["time"].values, path)
    gaps = missing_times(ds["time"].values, step) if step is not None else np.array([], "datetime64[ns]")
    if gaps.size:
        # A set of analysis states to start forecasts from has gaps by design (``sparse_times``).
        (log.debug if sparse_times else log.warning)("%s: %d time step(s) missing from the %s axis, e.g. %s", path, gaps.size, format_timedelta(step), format_times(gaps))
    return ds


def time_step(times: np.ndarray, source: str | Path = "dataset") -> np.timedelta64 | None:
    """The regular step of an ascending datetime64 axis: its most common spacing (the smallest on a tie).

    None for a single time. Raises :class:`BdlensError` if some spacing is not a whole multiple of
    that step (a time off the regular lattice); whole multiples are gaps, see :func:`missing_times`.
    """
    times = np.asarray(times, "datetime64[ns]")
    if times.size < 2:
        return None
    diffs = np.diff(times)
    values, counts = np.unique(diffs, return_counts=True)  # sorted ascending, so argmax takes the smallest on ties
    step = values[np.argmax(counts)]
    bad = diffs % step != np.timedelta64(0)
    if np.any(bad):
        where = times[1:][bad][:3]
        raise BdlensError(
            f"{source}: irregular time axis: spacing is not a multiple of {format_timedelta(step)} before {format_times(where)}; "
            "resample the data to a regular step"
        )
    return step


def missing_times(times: np.ndarray, step: np.timedelta64) -> np.ndarray:
    """Times on the regular ``step`` lattice from the first to the last of ``times`` that are absent (datetime64[ns])."""
    times = np.asarray(times, "datetime64[ns]")
    expected = np.arange(times[0], times[-1] + step, step)
    return expected[~np.isin(expected, times)]


def check_finite(ds: xr.Dataset, variables: Iterable[str] | None = None, source: str | Path = "dataset") -> None:
    """Raise :class:`BdlensError` if any requested field holds NaN or ±inf, naming the variable and times.

    Lazy: one dask pass reduces each variable to a per-time flag chunk by chunk, so memory stays at a
    few chunks even for a large store.
    """
    names = list(ds.data_vars) if variables is None else list(variables)
    flags = {}
    for name in names:
        da = ds[name]
        reduce_dims = [d for d in da.dims if d != "time"]
        flags[name] = (~np.isfinite(da)).any(dim=reduce_dims)
    with reading(source):
        (computed,) = dask.compute(flags)
    for name, bad in computed.items():
        if bool(bad.any()):
            where = f" at {format_times(bad['time'].values[bad.values])}" if "time" in bad.dims else ""
            raise BdlensError(
                f"{source}: variable {name} has NaN/inf values{where}; fill or drop those times "
                "(or choose a time range without them)"
            )


def format_timedelta(step: np.timedelta64 | None) -> str:
    """A time step in hours for messages, e.g. ``6h``."""
    if step is None:
        return "?"
    hours = step / np.timedelta64(1, "h")
    return f"{hours:g}h"


def format_times(times: np.ndarray, limit: int = 5) -> str:
    """The first ``limit`` datetime64 values to the minute for messages, with a count of the rest."""
    shown = ", ".join(np.datetime_as_string(np.asarray(times[:limit], "datetime64[m]")))
    more = f" (and {times.size - limit} more)" if times.size > limit else ""
    return shown + more
