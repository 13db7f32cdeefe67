"""Normalisation statistics: one mean and one std per 2-D field (variable × level), docs/science.md §1.

The statistics are **latitude-weighted** with the cell-area weights of :func:`bdlens.grid.lat_weights`:
they describe the global area average, so the pole rows of grids that include the poles (240×121,
1440×721, where a row holds as many points as the equator row but covers a sliver of area) do not pull
the mean and std towards polar values. This matches the latitude-weighted loss and metrics used
everywhere else in bdlens.

They are computed once, in a single dask pass over the training period (means of x and x² in float64;
the cancellation in var = E[x²] − E[x]² costs about log10(mean²/var) of float64's 16 digits, e.g. 4
for upper-level geopotential, so single-pass is safe and reads the data only once), saved as
a small JSON file beside the dataset or checkpoint, and reloaded. The file carries a cache key (data
identity, variables, levels and the actual times used), so a file made for another time range or
other variables is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.grid import lat_weights

log = logging.getLogger(__name__)

# Bumped when the way statistics are computed changes, so old files are recomputed.
_STATS_VERSION = 1

TimeBounds = tuple[str | np.datetime64 | None, str | np.datetime64 | None]
Step = str | np.timedelta64


@dataclass(frozen=True)
class NormStats:
    """Per-field mean and std. Upper-air entries have shape (len(levels),), surface/constant ones shape ()."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    levels: tuple[int, ...]
    key: str

    def field(self, variable: str, levels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of ``variable`` in its units, at ``levels`` (hPa; shape (Z,)) or surface (shape ())."""
        if variable not in self.mean:
            raise BdlensError(
                f"normalisation statistics have no entry for {variable} (they cover {', '.join(self.mean)}); "
                "recompute them with this variable"
            )
        mean, std = self.mean[variable], self.std[variable]
        if levels is None or mean.ndim == 0:
            return mean, std
        missing = [lev for lev in levels if lev not in self.levels]
        if missing:
            raise BdlensError(f"normalisation statistics have no level(s) {missing} hPa (they cover {list(self.levels)}); recompute them")
        index = [self.levels.index(lev) for lev in levels]
        return mean[index], std[index]

    def to_dict(self) -> dict:
        """A JSON-serialisable form (used by :meth:`save` and for embedding in checkpoints)."""
        return {
            "version": _STATS_VERSION,
            "key": self.key,
            "levels": list(self.levels),
            "mean": {k: v.tolist() for k, v in self.mean.items()},
            "std": {k: v.tolist() for k, v in self.std.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> NormStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            mean={k: np.asarray(v, np.float64) for k, v in data["mean"].items()},
            std={k: np.asarray(v, np.float64) for k, v in data["std"].items()},
            levels=tuple(int(lev) for lev in data["levels"]),
            key=str(data["key"]),
        )

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON (atomically, so a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise BdlensError(f"{path}: no such normalisation-statistics file; compute it with load_or_compute_stats") from err
        except (ValueError, KeyError, TypeError) as err:
            raise BdlensError(f"{path}: not a valid normalisation-statistics file ({err}); delete it to recompute") from err


def default_stats_path(data_path: str | Path) -> Path:
    """Where statistics for a dataset live by default: ``<dataset>.normstats.json`` beside it."""
    data_path = Path(data_path)
    return data_path.with_name(data_path.name + ".normstats.json")


def _training_subset(
    ds: xr.Dataset, time_range: TimeBounds | None, variables: Sequence[str] | None, difference_step: Step | None = None
) -> xr.Dataset:
    names = list(ds.data_vars) if variables is None else list(variables)
    sub = ds[names]
    if time_range is not None and "time" in sub.dims:
        sub = sub.sel(time=slice(*time_range))
        if sub.sizes["time"] == 0:
            raise BdlensError(
                f"no data in the time range {time_range[0]} … {time_range[1]} "
                f"(the data cover {ds['time'].values[0]} … {ds['time'].values[-1]}); fix the training split"
            )
    return sub if difference_step is None else _differences(sub, difference_step)


def _differences(sub: xr.Dataset, step: Step) -> xr.Dataset:
    """X(t + Δ) − X(t) in float64 for every t with both times in ``sub``, labelled by t + Δ."""
    delta = pd.Timedelta(step).to_timedelta64().astype("timedelta64[ns]")
    times = sub["time"].values if "time" in sub.dims else np.array([], "datetime64[ns]")
    start = times[np.isin(times + delta, times)]
    if start.size == 0:
        raise BdlensError(f"no pair of times {step} apart in the training period; use a longer period or a shorter step")
    later = sub.sel(time=start + delta).astype(np.float64)
    return later - sub.sel(time=start).astype(np.float64).assign_coords(time=start + delta)


def stats_key(
    ds: xr.Dataset,
    time_range: TimeBounds | None = None,
    variables: Sequence[str] | None = None,
    difference_step: Step | None = None,
) -> str:
    """Cache key of the statistics of ``ds`` over ``time_range`` for ``variables`` (hex string).

    It hashes what the numbers depend on: the variables, levels, grid, the first/last/count of the
    times actually used, the difference step if any, and the dataset's attributes (where the demo
    world records its settings).
    """
    sub = _training_subset(ds, time_range, variables)
    times = sub["time"].values if "time" in sub.dims else np.array([], "datetime64[ns]")
    identity = {
        "version": _STATS_VERSION,
        "variables": sorted(map(str, sub.data_vars)),
        "levels": sub["level"].values.tolist() if "level" in sub.dims else [],
        "grid": [sub.sizes.get("latitude"), sub.sizes.get("longitude")],
        "times": [str(times[0]), str(times[-1]), int(times.size)] if times.size else [],
        "attrs": json.dumps(ds.attrs, sort_keys=True, default=str),
        "difference_step": None if difference_step is None else str(pd.Timedelta(difference_step)),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def compute_stats(
    ds: xr.Dataset,
    time_range: TimeBounds | None = None,
    variables: Sequence[str] | None = None,
    difference_step: Step | None = None,
) -> NormStats:
    """Latitude-weighted mean/std of each variable (per level) over ``time_range`` (inclusive), one dask pass.

    ``ds`` in canonical layout (see :func:`bdlens.data.open_dataset`); fields without a time
    dimension (constants) are reduced over latitude/longitude only. With ``difference_step`` Δ
    (e.g. "6h") the statistics are those of the tendency X(t + Δ) − X(t) over the pairs inside the
    range, the scale of a residual target (GraphCast, diffusion). A field with zero spread gets
    std 1 (a warning says which), so normalising it never divides by zero.
    """
    sub = _training_subset(ds, time_range, variables, difference_step)
    # lat_weights has mean 1 over latitude, so mean(w·x) over every (time, lat, lon) is the area mean.
    weights = xr.DataArray(lat_weights(sub["latitude"].values), dims="latitude")
    moments = {}
    for name, da in sub.data_vars.items():
        x = da.astype(np.float64)
        dims = [d for d in x.dims if d != "level"]
        moments[name] = ((x * weights).mean(dims, skipna=False), (x * x * weights).mean(dims, skipna=False))
    (computed,) = dask.compute(moments)
    mean, std = {}, {}
    for name, (m1, m2) in computed.items():
        m1, m2 = np.asarray(m1.values, np.float64), np.asarray(m2.values, np.float64)
        if not (np.all(np.isfinite(m1)) and np.all(np.isfinite(m2))):
            raise BdlensError(f"{name} has NaN/inf values in the training period; find them with bdlens.data.check_finite and fix the data")
        s = np.sqrt(np.maximum(m2 - m1 * m1, 0.0))
        flat = s <= 1e-12 * np.maximum(np.abs(m1), 1.0)
        if np.any(flat):
            log.warning("%s has no spread over the training period; using std 1 for it", name)
            s = np.where(flat, 1.0, s)
        mean[str(name)], std[str(name)] = m1, s
    levels = tuple(int(lev) for lev in sub["level"].values) if "level" in sub.dims else ()
    return NormStats(mean=mean, std=std, levels=levels, key=stats_key(ds, time_range, variables, difference_step))


def load_or_compute_stats(
    ds: xr.Dataset,
    path: str | Path,
    time_range: TimeBounds | None = None,
    variables: Sequence[str] | None = None,
    difference_step: Step | None = None,
) -> NormStats:
    """The statistics at ``path`` if their cache key matches the arguments of :func:`compute_stats`; else compute and save them."""
    path = Path(path)
    key = stats_key(ds, time_range, variables, difference_step)
    if path.exists():
        try:
            cached = NormStats.load(path)
        except BdlensError as err:
            log.warning("%s; recomputing", err)
        else:
            if cached.key == key:
                log.info("%s: reusing normalisation statistics", path)
                return cached
            log.info("%s: statistics were made for other data, times or variables; recomputing", path)
    bounds = [str(np.datetime64(t, "m")) if t is not None else "…" for t in (time_range or (None, None))]
    log.info("computing normalisation statistics over %s to %s", *bounds)
    stats = compute_stats(ds, time_range, variables, difference_step)
    stats.save(path)
    return stats
