"""Latitude weights and the explicit reductions every metric shares (docs/science.md §1, §7).

Reduction policy, common to all metrics: ``dims`` names the dimensions averaged over. ``None`` means
the default ``("time", "latitude", "longitude")`` restricted to those present; an explicit sequence
must name existing dimensions. Averages over ``latitude`` use cell-area weights (mean 1); all other
dimensions are averaged with equal weights. NaN points are skipped by the averages and the weights are
renormalised over the valid points (so masked truth, or init/lead pairs without a verifying truth,
simply drop out). Every reduced result carries ``attrs["reduced_over"]`` saying what was done.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr

from bdlens import grid
from bdlens.errors import BdlensError

XArray = xr.DataArray | xr.Dataset

DEFAULT_REDUCE_DIMS: tuple[str, ...] = ("time", "latitude", "longitude")


def lat_weights(latitude: xr.DataArray | np.ndarray) -> xr.DataArray:
    """Cell-area latitude weights with mean 1 as an xarray, dims ``("latitude",)``.

    Thin wrapper of :func:`bdlens.grid.lat_weights` (the single implementation); ``latitude`` is in
    degrees, equally spaced, either order. Coordinates are kept so the weights align with the data.
    """
    if isinstance(latitude, xr.DataArray):
        values = np.asarray(latitude.values)
        coords = {latitude.dims[0]: latitude.values}
        dim = latitude.dims[0]
    else:
        values = np.asarray(latitude)
        dim = "latitude"
        coords = {dim: values}
    try:
        weights = grid.lat_weights(values)
    except ValueError as err:
        raise BdlensError(str(err)) from err
    return xr.DataArray(weights, dims=(dim,), coords=coords, name="lat_weights")


def resolve_dims(obj: XArray, dims: Sequence[Hashable] | None, exclude: Sequence[Hashable] = ()) -> tuple[Hashable, ...]:
    """The dimensions to reduce over: the default set present in ``obj``, or ``dims`` checked to exist."""
    if dims is None:
        return tuple(d for d in DEFAULT_REDUCE_DIMS if d in obj.dims and d not in exclude)
    dims = (dims,) if isinstance(dims, str) else tuple(dims)
    missing = [d for d in dims if d not in obj.dims]
    if missing:
        raise BdlensError(f"cannot reduce over {missing}: not dimensions of the data {tuple(obj.dims)}")
    clash = [d for d in dims if d in exclude]
    if clash:
        raise BdlensError(f"cannot reduce over {clash}: that dimension is consumed by the metric itself")
    return dims


def describe_reduction(dims: Sequence[Hashable]) -> str:
    """The ``reduced_over`` attribute: which dimensions were averaged and how."""
    if not dims:
        return "none (pointwise)"
    parts = [f"{d} (cell-area weighted)" if d == "latitude" else str(d) for d in dims]
    return ", ".join(parts) + "; NaN points skipped, weights renormalised"


def _reduce(obj: XArray, dims: Sequence[Hashable], how: str) -> XArray:
    """``obj.mean`` or ``obj.sum`` over ``dims``, cell-area weighted when latitude is among them."""
    dims = tuple(dims)
    if not dims:
        return obj
    source = obj.weighted(lat_weights(obj["latitude"])) if "latitude" in dims else obj
    return getattr(source, how)(dims, skipna=True)


def weighted_mean(obj: XArray, dims: Sequence[Hashable]) -> XArray:
    """Mean over ``dims``: cell-area weighted along latitude, equal weights elsewhere, NaNs skipped."""
    return _reduce(obj, dims, "mean")


def weighted_sum(obj: XArray, dims: Sequence[Hashable]) -> XArray:
    """Sum over ``dims``, with latitude cell-area weights (mean 1) when latitude is among them."""
    return _reduce(obj, dims, "sum")


def annotate(obj: XArray, dims: Sequence[Hashable], **attrs: object) -> XArray:
    """Attach ``reduced_over`` and further metric attributes (to each variable of a Dataset)."""
    attrs = {"reduced_over": describe_reduction(dims), **{k: str(v) for k, v in attrs.items()}}
    if isinstance(obj, xr.Dataset):
        for name in obj.data_vars:
            obj[name].attrs.update(attrs)
    obj.attrs.update(attrs)
    return obj


def require_members(forecast: XArray, member_dim: Hashable, minimum: int = 1) -> int:
    """The ensemble size; a :class:`BdlensError` if the member dimension is missing or too small."""
    if member_dim not in forecast.dims:
        raise BdlensError(
            f"forecast has no member dimension {member_dim!r} (dims {tuple(forecast.dims)}); "
            "pass the right name with member_dim / --member-dim"
        )
    size = forecast.sizes[member_dim]
    if size < minimum:
        raise BdlensError(f"this metric needs at least {minimum} ensemble members along {member_dim!r}, got {size}")
    return size


def whole_members(forecast: XArray, member_dim: Hashable) -> XArray:
    """``forecast`` with the member dimension in one dask chunk (the only dimension that must be whole)."""
    if forecast.chunks:
        return forecast.chunk({member_dim: -1})
    return forecast
