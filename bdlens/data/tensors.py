"""The one place where xarray fields become torch tensors and back.

A :class:`FieldLayout` fixes which fields a model sees and in which order:

* ``upper``:   (B, V_upper, Z, H, W) — ``upper_variables`` × ``levels`` (hPa, ascending) × latitude
  (ascending, south → north) × longitude ([0, 360) ascending);
* ``surface``: (B, V_surface, H, W) — ``surface_variables`` × latitude × longitude;
* constants (optional): (C, H, W) — ``constant_variables`` (time-independent, e.g. land-sea mask).

B stacks every other dimension of the Dataset in canonical order (e.g. ``time``, or
``number × time`` for an ensemble), so ``from_tensors`` needs those coordinates back. Normalisation
is ``(x − mean) / std`` per variable and level (:class:`bdlens.data.NormStats`) and is applied on
tensors, so the model, trainers and ensemble engine can (de)normalise without going through xarray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import xarray as xr

from bdlens.data.normalization import NormStats
from bdlens.data.reader import CANONICAL_DIMS
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS, SURFACE_VARIABLES, UPPER_AIR_VARIABLES, VARIABLE_ATTRS, Grid, grid_from_coords


class Fields(NamedTuple):
    """A model state: ``upper`` (..., V_upper, Z, H, W) and ``surface`` (..., V_surface, H, W) tensors."""

    upper: torch.Tensor
    surface: torch.Tensor


def stack_times(states: Sequence[Fields]) -> Fields:
    """Stack per-time states (oldest first) on a new axis 1: upper (B, T, V, Z, H, W), surface (B, T, V, H, W).

    This turns the dataset's input tuple ``(X_{t−Δ}, X_t)`` (after batching) into the model's input.
    """
    return Fields(torch.stack([s.upper for s in states], dim=1), torch.stack([s.surface for s in states], dim=1))


class NormTensors(NamedTuple):
    """Normalisation constants shaped to broadcast against :class:`Fields` (float64 → requested dtype).

    ``upper_mean``/``upper_std``: (V_upper, Z, 1, 1); ``surface_mean``/``surface_std``: (V_surface, 1, 1).
    """

    upper_mean: torch.Tensor
    upper_std: torch.Tensor
    surface_mean: torch.Tensor
    surface_std: torch.Tensor


def _canonical_order(names: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    # Known WB2 names first in their conventional order, then others alphabetically, so two stores
    # that list the same variables differently give the same layout (and the same model channels).
    rank = {name: i for i, name in enumerate(known)}
    return tuple(sorted(names, key=lambda n: (rank.get(n, len(rank)), n)))


@dataclass(frozen=True)
class FieldLayout:
    """Which fields a model sees, in which order, on which grid (see the module docstring for shapes)."""

    upper_variables: tuple[str, ...]
    levels: tuple[int, ...]
    surface_variables: tuple[str, ...]
    grid: Grid
    constant_variables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (from YAML/JSON) but store tuples, so layouts compare and hash by value.
        for name in ("upper_variables", "surface_variables", "constant_variables"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        object.__setattr__(self, "levels", tuple(int(lev) for lev in self.levels))

    def to_dict(self) -> dict:
        """A JSON-serialisable form (for checkpoints); the grid is stored by name."""
        return {
            "upper_variables": list(self.upper_variables),
            "levels": list(self.levels),
            "surface_variables": list(self.surface_variables),
            "grid": self.grid.name,
            "constant_variables": list(self.constant_variables),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FieldLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "grid": GRIDS[data["grid"]]})

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, constants: xr.Dataset | None = None) -> FieldLayout:
        """The layout of every field in a canonical Dataset: variables with a ``level`` dim are upper air."""
        upper = [str(n) for n, da in ds.data_vars.items() if "level" in da.dims]
        surface = [str(n) for n, da in ds.data_vars.items() if "level" not in da.dims]
        levels = tuple(int(lev) for lev in ds["level"].values) if upper else ()
        grid = grid_from_coords(ds["latitude"].values, ds["longitude"].values)
        const = _canonical_order([str(n) for n in constants.data_vars], ()) if constants is not None else ()
        return cls(
            upper_variables=_canonical_order(upper, UPPER_AIR_VARIABLES),
            levels=levels,
            surface_variables=_canonical_order(surface, SURFACE_VARIABLES),
            grid=grid,
            constant_variables=const,
        )

    @property
    def variables(self) -> tuple[str, ...]:
        """Upper-air then surface variable names (constants excluded)."""
        return self.upper_variables + self.surface_variables

    @property
    def channel_names(self) -> tuple[str, ...]:
        """``<variable>_<level>`` for the upper-air channels, then the surface variables: the order of
        a state flattened to channels (upper (V, Z) then surface V), as in the validation scores."""
        return tuple(f"{v}_{z}" for v in self.upper_variables for z in self.levels) + self.surface_variables

    @property
    def upper_shape(self) -> tuple[int, int, int, int]:
        """(V_upper, Z, H, W) of one upper-air state."""
        return (len(self.upper_variables), len(self.levels), self.grid.nlat, self.grid.nlon)

    @property
    def surface_shape(self) -> tuple[int, int, int]:
        """(V_surface, H, W) of one surface state."""
        return (len(self.surface_variables), self.grid.nlat, self.grid.nlon)

    # ---------------------------------------------------------------- xarray → tensors

    def to_tensors(self, ds: xr.Dataset, stats: NormStats | None = None, dtype: torch.dtype = torch.float32) -> Fields:
        """Convert a canonical Dataset to ``Fields(upper (B, V, Z, H, W), surface (B, V, H, W))``.

        B stacks every dimension other than level/latitude/longitude in canonical order (1 if none).
        Extra variables and levels in ``ds`` are ignored; missing ones raise :class:`BdlensError`.
        With ``stats`` the tensors are normalised.
        """
        sub = self.select(ds)
        batch_dims = self._batch_dims(sub)
        sub = sub.transpose(*batch_dims, "level", "latitude", "longitude", missing_dims="ignore").compute()
        batch = int(np.prod([ds.sizes[d] for d in batch_dims], dtype=np.int64))
        fields = Fields(
            self._stack(sub, self.upper_variables, batch, self.upper_shape[1:], dtype),
            self._stack(sub, self.surface_variables, batch, self.surface_shape[1:], dtype),
        )
        return self.normalise(fields, stats) if stats is not None else fields

    def select(self, ds: xr.Dataset) -> xr.Dataset:
        """The layout's variables (in layout order) at the layout's levels, from a canonical Dataset (still lazy).

        Raises :class:`BdlensError` naming what is missing, or if the grid is not the layout's.
        """
        self._check_dataset(ds, self.variables, check_levels=bool(self.upper_variables))
        sub = ds[list(self.variables)]
        return sub.sel(level=list(self.levels)) if self.upper_variables else sub

    def constants_tensor(
        self, constants: xr.Dataset, stats: NormStats | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The constant fields as a (C, H, W) tensor, each normalised by its own entry in ``stats`` if given."""
        self._check_dataset(constants, self.constant_variables, check_levels=False)
        sub = constants[list(self.constant_variables)].transpose(..., "latitude", "longitude").compute()
        out = self._stack(sub, self.constant_variables, 1, self.surface_shape[1:], torch.float64)[0]
        if stats is not None:
            mean = torch.tensor([float(stats.field(v)[0]) for v in self.constant_variables], dtype=torch.float64)
            std = torch.tensor([float(stats.field(v)[1]) for v in self.constant_variables], dtype=torch.float64)
            out = (out - mean[:, None, None]) / std[:, None, None]
        return out.to(dtype)

    def _check_dataset(self, ds: xr.Dataset, names: Sequence[str], check_levels: bool) -> None:
        missing = [v for v in names if v not in ds.data_vars]
        if missing:
            raise BdlensError(f"dataset lacks variable(s) {', '.join(missing)} of the model layout; provide them")
        if check_levels:
            absent = [lev for lev in self.levels if "level" not in ds.dims or lev not in ds["level"].values]
            if absent:
                raise BdlensError(f"dataset lacks level(s) {absent} hPa of the model layout; provide them")
        lat, lon = ds["latitude"].values, ds["longitude"].values
        if not (
            lat.size == self.grid.nlat
            and lon.size == self.grid.nlon
            and np.allclose(lat, self.grid.latitudes())
            and np.allclose(lon, self.grid.longitudes())
        ):
            raise BdlensError(
                f"dataset grid {lon.size}x{lat.size} does not match the layout's {self.grid.name} grid in canonical order; "
                "open it with bdlens.data.open_dataset"
            )

    def _batch_dims(self, ds: xr.Dataset) -> list[str]:
        spatial = {"level", "latitude", "longitude"}
        batch: list[str] | None = None
        for name in self.variables:
            dims = [d for d in ds[name].dims if d not in spatial]
            ordered = sorted(dims, key=lambda d: CANONICAL_DIMS.index(d) if d in CANONICAL_DIMS else len(CANONICAL_DIMS))
            if batch is None:
                batch = ordered
            elif ordered != batch:
                raise BdlensError(f"variable {name} has batch dims {ordered}, others have {batch}; give all fields the same dims")
        return batch or []

    @staticmethod
    def _stack(
        ds: xr.Dataset, names: Sequence[str], batch: int, field_shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """(batch, len(names), *field_shape): each variable flattened over its batch dims, stacked on axis 1."""
        if not names:
            return torch.zeros((batch, 0, *field_shape), dtype=dtype)
        stacked = np.stack([np.asarray(ds[n].values).reshape(batch, *field_shape) for n in names], axis=1)
        return torch.from_numpy(stacked).to(dtype)

    # ---------------------------------------------------------------- tensors → xarray

    def from_tensors(
        self,
        fields: Fields,
        coords: Mapping[str, Sequence | np.ndarray] | None = None,
        stats: NormStats | None = None,
        attrs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> xr.Dataset:
        """Convert ``Fields`` back to a canonical Dataset (float32 unless the tensors are float64).

        ``coords``: the batch dimensions and their values, in order (e.g. ``{"time": times}`` or
        ``{"number": members, "time": inits}``); their sizes must multiply to B. Without ``coords``,
        B must be 1 and the result has no batch dim. With ``stats`` the tensors are de-normalised
        first. ``attrs`` override the CF attributes of :data:`bdlens.grid.VARIABLE_ATTRS` per variable.
        """
        if stats is not None:
            fields = self.denormalise(fields, stats)
        coords = dict(coords or {})
        batch_shape = tuple(len(v) for v in coords.values())
        batch = fields.upper.shape[0] if self.upper_variables else fields.surface.shape[0]
        if int(np.prod(batch_shape, dtype=np.int64)) != batch:
            raise BdlensError(f"batch coordinates {dict(zip(coords, batch_shape))} do not multiply to the batch size {batch}")
        self._check_shapes(fields, batch)
        upper = fields.upper.detach().cpu().numpy().reshape(*batch_shape, *self.upper_shape)
        surface = fields.surface.detach().cpu().numpy().reshape(*batch_shape, *self.surface_shape)
        batch_dims = tuple(coords)
        attrs = {**VARIABLE_ATTRS, **(attrs or {})}
        data_vars = {}
        for i, name in enumerate(self.upper_variables):
            data_vars[name] = (batch_dims + ("level", "latitude", "longitude"), upper[..., i, :, :, :], dict(attrs.get(name, {})))
        for i, name in enumerate(self.surface_variables):
            data_vars[name] = (batch_dims + ("latitude", "longitude"), surface[..., i, :, :], dict(attrs.get(name, {})))
        out_coords = {
            **{k: np.asarray(v) for k, v in coords.items()},
            "latitude": ("latitude", self.grid.latitudes(), {"units": "degrees_north", "long_name": "latitude"}),
            "longitude": ("longitude", self.grid.longitudes(), {"units": "degrees_east", "long_name": "longitude"}),
        }
        if self.upper_variables:
            out_coords["level"] = ("level", np.asarray(self.levels, np.int64), {"units": "hPa", "long_name": "pressure level"})
        return xr.Dataset(data_vars, coords=out_coords)

    def _check_shapes(self, fields: Fields, batch: int) -> None:
        if self.upper_variables and tuple(fields.upper.shape) != (batch, *self.upper_shape):
            raise BdlensError(f"upper tensor has shape {tuple(fields.upper.shape)}, the layout needs {(batch, *self.upper_shape)}")
        if self.surface_variables and tuple(fields.surface.shape) != (batch, *self.surface_shape):
            raise BdlensError(f"surface tensor has shape {tuple(fields.surface.shape)}, the layout needs {(batch, *self.surface_shape)}")

    # ---------------------------------------------------------------- normalisation on tensors

    def norm_tensors(self, stats: NormStats, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> NormTensors:
        """Means and stds of this layout's fields as broadcastable tensors (shapes in :class:`NormTensors`)."""
        up = [stats.field(v, self.levels) for v in self.upper_variables]
        sf = [stats.field(v) for v in self.surface_variables]

        def as_tensor(values: list[np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, np.float64).reshape(shape), dtype=dtype, device=device)

        nu, nz, ns = len(self.upper_variables), len(self.levels), len(self.surface_variables)
        return NormTensors(
            upper_mean=as_tensor([m for m, _ in up], (nu, nz, 1, 1)),
            upper_std=as_tensor([s for _, s in up], (nu, nz, 1, 1)),
            surface_mean=as_tensor([m for m, _ in sf], (ns, 1, 1)),
            surface_std=as_tensor([s for _, s in sf], (ns, 1, 1)),
        )

    def normalise(self, fields: Fields, stats: NormStats) -> Fields:
        """``(x − mean) / std`` per variable and level, in the tensors' dtype; works for any leading dims.

        float32 arithmetic costs at most ~1e-5 in normalised units (|mean|/std · 2⁻²⁴, worst for
        upper-level geopotential), far below any forecast error, and is several times faster than a
        float64 round trip; pass float64 tensors where exactness matters.
        """
        n = self.norm_tensors(stats, fields.upper.dtype, fields.upper.device)
        return Fields((fields.upper - n.upper_mean) / n.upper_std, (fields.surface - n.surface_mean) / n.surface_std)

    def denormalise(self, fields: Fields, stats: NormStats) -> Fields:
        """Inverse of :meth:`normalise`: ``x · std + mean``, in physical units and the tensors' dtype."""
        n = self.norm_tensors(stats, fields.upper.dtype, fields.upper.device)
        return Fields(fields.upper * n.upper_std + n.upper_mean, fields.surface * n.surface_std + n.surface_mean)
