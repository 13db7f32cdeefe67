"""The forecast store: a WB2-layout zarr written region by region, with a ledger for exact resume.

Layout (docs/ensemble.md): variables with dims (number, time, prediction_timedelta, [level],
latitude, longitude), float32, NaN where nothing was written yet; ``weight_sample(number)`` and
``perturbation_draw(number)`` coordinates; chunks of ``chunk`` members × 1 init × 1 lead (one file
per variable, member chunk, init and lead, never one per member). The work is cut into *units*
(one init × one member chunk); a unit's regions are written as its leads finish and the unit is
recorded in the ledger (``.bdlens-ledger/<init>-<chunk>.json``, one file per unit so that several
processes never write the same file) only when all its leads are on disk. A resumed run skips the
recorded units and recomputes the others whole, so it ends bit-identical to an uninterrupted run.
The root's ``complete`` attribute turns true only when every unit is recorded and the
decomposition is written: an interrupted store never looks finished.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from bdlens.data import FieldLayout
from bdlens.errors import BdlensError
from bdlens.outputs import ZARR_LAYOUT
from bdlens.world.store import coordinate_attrs

LEDGER = ".bdlens-ledger"
#: every file of a forecast store: the zarr arrays and the per-unit ledger (``--overwrite`` refuses others)
STORE_LAYOUT = (*ZARR_LAYOUT, f"{LEDGER}/*")
DECOMPOSITION = "decomposition"
# Zarr v2, as WeatherBench2 and the world stores: WB2 tooling reads it unchanged.
ZARR_FORMAT = 2
# The ledger and the output marker live beside the arrays; zarr lists them as unknown objects.
warnings.filterwarnings("ignore", message=r"Object at \.bdlens", category=UserWarning)


def create_store(
    path: Path, layout: FieldLayout, coords: Mapping[str, Any], chunk: int, attrs: Mapping[str, Any]
) -> None:
    """Write the store's metadata and coordinates (no data yet: every value reads as NaN)."""
    sizes = {name: len(coords[name]) for name in ("number", "time", "prediction_timedelta")}
    lat, lon = layout.grid.nlat, layout.grid.nlon
    data_vars = {}
    for name in layout.upper_variables + layout.surface_variables:
        spatial = (len(layout.levels), lat, lon) if name in layout.upper_variables else (lat, lon)
        dims = ("number", "time", "prediction_timedelta") + (("level",) if len(spatial) == 3 else ()) + ("latitude", "longitude")
        shape = tuple(sizes.values()) + spatial
        data_vars[name] = (dims, da.full(shape, np.nan, dtype=np.float32, chunks=(chunk, 1, 1) + spatial))
    # The data's own latitude/longitude when given (they may differ from the grid's by round-off, and
    # the forecast must align exactly with the truth it is verified against).
    full_coords = {"latitude": layout.grid.latitudes(), "longitude": layout.grid.longitudes(), **coords}
    if layout.upper_variables:
        full_coords["level"] = np.asarray(layout.levels, np.int64)
    ds = coordinate_attrs(xr.Dataset(data_vars, coords=full_coords, attrs=dict(attrs)))
    encoding = {name: {"_FillValue": np.float32(np.nan)} for name in data_vars}
    ds.to_zarr(path, mode="a", compute=False, encoding=encoding, consolidated=True, zarr_format=ZARR_FORMAT)
    (path / LEDGER).mkdir()


def write_region(path: Path, ds: xr.Dataset, region: Mapping[str, slice]) -> None:
    """Write ``ds`` (dims number, time, prediction_timedelta, …) into ``region`` of the store."""
    drop = [c for c in ds.coords if not set(ds[c].dims) & set(region)] + [c for c in ("weight_sample", "perturbation_draw") if c in ds.coords]
    ds.drop_vars(drop).to_zarr(path, region=dict(region), safe_chunks=False)


def unit_name(init_index: int, chunk_index: int) -> str:
    return f"{init_index}-{chunk_index}"


def record_unit(path: Path, name: str, info: Mapping[str, Any]) -> None:
    """Record a finished unit (atomically: a reader sees the file whole or not at all)."""
    tmp = path / LEDGER / f".{name}.tmp"
    tmp.write_text(json.dumps(dict(info)))
    tmp.replace(path / LEDGER / f"{name}.json")


def finished_units(path: Path) -> dict[str, dict[str, Any]]:
    """The ledger: unit name → what was recorded for it."""
    ledger = path / LEDGER
    if not ledger.is_dir():
        raise BdlensError(f"{path} has no {LEDGER}; it was not written by `bdlens ensemble` and cannot be resumed")
    return {p.stem: json.loads(p.read_text()) for p in ledger.glob("*.json")}


def stored_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of the store."""
    return dict(zarr.open_group(str(path), mode="r").attrs)


def finalise(path: Path, decomposition: xr.Dataset | None, attrs: Mapping[str, Any]) -> None:
    """Write the decomposition group and the final attributes (``complete`` last), then reconsolidate."""
    if decomposition is not None:
        decomposition.to_zarr(path, group=DECOMPOSITION, mode="w", consolidated=True, zarr_format=ZARR_FORMAT)
    group = zarr.open_group(str(path), mode="a", zarr_format=ZARR_FORMAT)
    group.attrs.update({**attrs, "complete": True})
    with warnings.catch_warnings():  # the ledger and the output marker are ours, not zarr nodes
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=ZARR_FORMAT)


def open_forecast(path: str | Path) -> xr.Dataset:
    """Open a finished forecast store lazily; an unfinished one is an error that says how to finish it."""
    path = Path(path)
    if not (path / ".zgroup").is_file() and not (path / "zarr.json").is_file():
        raise BdlensError(f"{path} is not a zarr store")
    ds = xr.open_zarr(path, consolidated=True, chunks={})
    if ds.attrs.get("complete") is False:
        raise BdlensError(f"{path} is an unfinished `bdlens ensemble` run; finish it with the same command and --resume")
    return ds
