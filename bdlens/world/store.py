"""Writing WB2-layout zarr stores atomically and with CF metadata."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.grid import VARIABLE_ATTRS
from bdlens.outputs import mark_output, partial_path, prepare_output, replace_with

# The demo world's surface fields are stand-ins; their CF attributes say so on top of the shared ones.
_STAND_IN_COMMENTS = {
    "mean_sea_level_pressure": "the demo world is flat, so this is also the surface pressure",
    "2m_temperature": "demo world stand-in: temperature of the lowest sigma layer",
    "10m_u_component_of_wind": "demo world stand-in: wind of the lowest sigma layer",
    "10m_v_component_of_wind": "demo world stand-in: wind of the lowest sigma layer",
}
WORLD_VARIABLE_ATTRS = {
    name: {**attrs, **({"comment": _STAND_IN_COMMENTS[name]} if name in _STAND_IN_COMMENTS else {})}
    for name, attrs in VARIABLE_ATTRS.items()
}


def coordinate_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Attach CF attributes to the standard coordinates present in ``ds``."""
    attrs = {
        "latitude": {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude"},
        "longitude": {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude"},
        "level": {"units": "hPa", "standard_name": "air_pressure", "long_name": "pressure level", "positive": "down"},
        "time": {"standard_name": "time", "long_name": "initialisation or valid time"},
        "prediction_timedelta": {"long_name": "forecast lead time"},
        "number": {"long_name": "ensemble member number"},
    }
    for name, values in attrs.items():
        if name in ds.coords:
            ds[name].attrs.update(values)
    for name in ds.data_vars:
        ds[name].attrs.update(WORLD_VARIABLE_ATTRS.get(str(name), {}))
    return ds


@contextmanager
def atomic_directory(
    target: Path,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    layout: Sequence[str] = (),
    required: Sequence[str] = (),
) -> Iterator[Path]:
    """Yield a partial sibling directory that replaces ``target`` only if the block succeeds.

    ``target`` is checked first by :func:`bdlens.outputs.prepare_output` (the arguments are its own:
    an existing one is replaced only with ``overwrite`` and only if it is a bdlens ``kind``, never an
    input). The finished directory gets bdlens's marker; nothing is left behind on failure, and a
    partial left by a killed run is removed by the next one (:func:`bdlens.outputs.partial_path`).
    """
    target = Path(target)
    prepare_output(target, kind, overwrite, inputs=inputs, flag=flag, layout=layout, required=required, clear=False)
    tmp = partial_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mark_output(tmp, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_with(tmp, target)


def fields_dataset(fields: dict[str, np.ndarray], coords: dict[str, np.ndarray], leading: tuple[str, ...]) -> xr.Dataset:
    """A Dataset from field arrays whose leading dims are ``leading`` then (level,) lat, lon."""
    data_vars = {}
    for name, values in fields.items():
        spatial = ("level", "latitude", "longitude") if values.ndim == len(leading) + 3 else ("latitude", "longitude")
        data_vars[name] = (leading + spatial, values)
    return coordinate_attrs(xr.Dataset(data_vars, coords=coords))
