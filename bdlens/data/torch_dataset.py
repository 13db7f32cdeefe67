"""PyTorch dataset of ((X_{t−(n−1)Δ}, …, X_t), X_{t+Δ}) samples for a step Δ over one time split.

A sample at anchor time t uses the times t − (n−1)Δ, …, t (inputs, oldest first) and t + Δ (target);
only anchors whose every time lies inside the split's range are used, so no sample of one split
reaches into another. Each state is a :class:`bdlens.data.tensors.Fields` pair
``(upper (V_upper, Z, H, W), surface (V_surface, H, W))``, normalised when statistics are given;
``torch.utils.data.default_collate`` batches them into (B, …) tensors. Constant fields (C, H, W)
are the same for every sample and live in :attr:`WeatherDataset.constants` rather than in samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import torch
import xarray as xr

from bdlens.data.normalization import NormStats, compute_stats, default_stats_path, load_or_compute_stats
from bdlens.data.reader import check_finite, format_timedelta, format_times, missing_times, open_dataset, reading, time_step
from bdlens.data.splits import DataConfig, load_data_config
from bdlens.data.tensors import FieldLayout, Fields
from bdlens.errors import BdlensError
from bdlens.grid import grid_from_coords
from bdlens.progress import bar

log = logging.getLogger(__name__)

Sample = tuple[tuple[Fields, ...], Fields]

# Times loaded per block when a split is loaded into memory (bounds the float64 scratch space).
_LOAD_BLOCK = 128


class WeatherDataset(torch.utils.data.Dataset):
    """Samples ``((X_{t−Δ}, X_t), X_{t+Δ})`` (``input_steps`` inputs) from a canonical Dataset.

    ``ds``: canonical layout (see :func:`bdlens.data.open_dataset`) holding the layout's fields.
    ``step``: Δ, a whole multiple of the data's time step. ``time_range``: inclusive (start, end)
    of the split (default: all times). ``in_memory``: load the split once as normalised float32
    tensors (fast epochs; the 3-year demo world is about 1 GB); otherwise each sample is read
    lazily. ``allow_gaps``: skip samples that need a missing time instead of raising.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        layout: FieldLayout,
        step: np.timedelta64 | str,
        time_range: tuple[np.datetime64 | str | None, np.datetime64 | str | None] | None = None,
        stats: NormStats | None = None,
        input_steps: int = 2,
        constants: xr.Dataset | None = None,
        in_memory: bool = False,
        allow_gaps: bool = False,
        source: str | Path = "dataset",
    ) -> None:
        if input_steps < 1:
            raise BdlensError(f"input_steps must be at least 1, got {input_steps}")
        self.layout = layout
        self.stats = stats
        self.input_steps = input_steps
        self.step = _as_timedelta(step)
        self._source = str(source)
        try:
            sub = layout.select(ds)
        except BdlensError as err:
            raise BdlensError(f"{source}: {err}") from err
        if time_range is not None:
            sub = sub.sel(time=slice(*time_range))
        if "time" not in sub.dims or sub.sizes["time"] == 0:
            raise BdlensError(f"{source}: no times in the range {time_range}; the data cover {_span(ds)}; fix the split")
        self._data = sub
        self._positions = self._sample_positions(ds["time"].values, sub["time"].values, allow_gaps)
        self._tensors: Fields | None = self._load(sub) if in_memory else None
        if self._tensors is None:
            check_finite(sub, source=source)
        self.constants: torch.Tensor | None = None
        if layout.constant_variables:
            if constants is None:
                raise BdlensError(f"the layout has constants {list(layout.constant_variables)} but none were given; pass constants=")
            self.constants = layout.constants_tensor(constants, compute_stats(constants) if stats is not None else None)

    def _sample_positions(self, all_times: np.ndarray, times: np.ndarray, allow_gaps: bool) -> np.ndarray:
        data_step = time_step(all_times, self._source)
        if data_step is None:
            raise BdlensError(f"{self._source}: only one time; a sample needs {self.input_steps + 1} times Δ apart")
        if self.step % data_step != np.timedelta64(0):
            raise BdlensError(
                f"{self._source}: the data's time step {format_timedelta(data_step)} does not divide Δ={format_timedelta(self.step)}; "
                f"choose Δ as a multiple of {format_timedelta(data_step)}"
            )
        gaps = missing_times(times, data_step) if times.size > 1 else times[:0]
        if gaps.size and not allow_gaps:
            raise BdlensError(
                f"{self._source}: the time axis is not regular enough for Δ={format_timedelta(self.step)}: {gaps.size} time(s) "
                f"missing: {format_times(gaps)}; fill the gaps or pass allow_gaps=True to skip the samples that need them"
            )
        offsets = np.arange(-(self.input_steps - 1), 2) * self.step  # inputs oldest first, then the target
        wanted = times[:, None] + offsets[None, :]
        complete = np.isin(wanted, times).all(axis=1)
        if gaps.size:
            log.warning("%s: skipping %d sample(s) that need one of %d missing time(s)", self._source, int((~complete).sum()), gaps.size)
        positions = np.searchsorted(times, wanted[complete])
        if positions.shape[0] == 0:
            raise BdlensError(
                f"{self._source}: no complete sample in {format_times(times[:1])} … {format_times(times[-1:])} for "
                f"Δ={format_timedelta(self.step)} with {self.input_steps} input time(s); use a longer time range"
            )
        return positions

    def _load(self, sub: xr.Dataset) -> Fields:
        """The split as normalised float32 tensors (T, V, Z, H, W) / (T, V, H, W), loaded block by block."""
        n = sub.sizes["time"]
        upper = torch.empty((n, *self.layout.upper_shape), dtype=torch.float32)
        surface = torch.empty((n, *self.layout.surface_shape), dtype=torch.float32)
        for start in bar(range(0, n, _LOAD_BLOCK), desc="loading split", unit="block"):
            with reading(self._source):
                block = self.layout.to_tensors(sub.isel(time=slice(start, start + _LOAD_BLOCK)), self.stats)
            upper[start : start + _LOAD_BLOCK] = block.upper
            surface[start : start + _LOAD_BLOCK] = block.surface
        if not (torch.isfinite(upper).all() and torch.isfinite(surface).all()):
            check_finite(sub, source=self._source)  # names the variable and times
        return Fields(upper, surface)

    def __len__(self) -> int:
        return int(self._positions.shape[0])

    @property
    def times(self) -> np.ndarray:
        """Anchor time t of every sample (datetime64[ns], shape (N,))."""
        return self._data["time"].values[self._positions[:, self.input_steps - 1]]

    def sample_times(self, index: int) -> np.ndarray:
        """The times of sample ``index``: inputs oldest first, then the target (shape (input_steps + 1,))."""
        return self._data["time"].values[self._positions[index]]

    def __getitem__(self, index: int) -> Sample:
        positions = self._positions[index]
        if self._tensors is not None:
            # index_select, not tensor[positions]: advanced indexing is ~40x slower here on CPU.
            index = torch.from_numpy(positions)
            states = Fields(self._tensors.upper.index_select(0, index), self._tensors.surface.index_select(0, index))
        else:
            # Synchronous: DataLoader workers already run in parallel; a dask pool per worker only thrashes.
            strides = np.diff(positions)
            # A strided slice (always, unless gaps were skipped) avoids dask's costly fancy-index shuffle.
            times = slice(positions[0], positions[-1] + 1, strides[0]) if np.all(strides == strides[0]) else positions
            with dask.config.set(scheduler="synchronous"):
                states = self.layout.to_tensors(self._data.isel(time=times), self.stats)
        per_time = [Fields(states.upper[i], states.surface[i]) for i in range(len(positions))]
        return tuple(per_time[:-1]), per_time[-1]


def _as_timedelta(step: np.timedelta64 | str) -> np.timedelta64:
    try:
        value = pd.Timedelta(step).to_timedelta64().astype("timedelta64[ns]")
    except (ValueError, TypeError) as err:
        raise BdlensError(f"step {step!r} is not a time step; use e.g. '6h' or '24h'") from err
    if value <= np.timedelta64(0):
        raise BdlensError(f"step must be positive, got {step!r}")
    return value


def _span(ds: xr.Dataset) -> str:
    if "time" not in ds.dims or ds.sizes["time"] == 0:
        return "no times"
    return f"{format_times(ds['time'].values[:1])} … {format_times(ds['time'].values[-1:])}"


def make_datasets(
    config: DataConfig | str | Path,
    data_path: str | Path | None = None,
    stats_path: str | Path | None = None,
    splits: Sequence[str] | None = None,
    in_memory: bool = False,
) -> dict[str, WeatherDataset]:
    """One :class:`WeatherDataset` per split of a data config, sharing statistics computed on ``train``.

    ``data_path`` overrides the config's ``path``; ``stats_path`` defaults to
    ``<data>.normstats.json`` beside the data (see :func:`load_or_compute_stats`).
    """
    cfg = config if isinstance(config, DataConfig) else load_data_config(config)
    path = data_path if data_path is not None else cfg.path
    if path is None:
        raise BdlensError("no data path: set `path` in the data config or pass data_path")
    variables = cfg.upper_variables + cfg.surface_variables
    ds = open_dataset(path, variables=variables, levels=cfg.levels if cfg.upper_variables else None)
    constants = None
    if cfg.constant_variables:
        constants = open_dataset(cfg.constants_path or path, variables=cfg.constant_variables)
    layout = FieldLayout(
        upper_variables=tuple(cfg.upper_variables),
        levels=tuple(cfg.levels) if cfg.upper_variables else (),
        surface_variables=tuple(cfg.surface_variables),
        grid=grid_from_coords(ds["latitude"].values, ds["longitude"].values),
        constant_variables=tuple(cfg.constant_variables),
    )
    stats = load_or_compute_stats(ds, stats_path or default_stats_path(path), cfg.splits["train"].bounds, variables)
    return {
        name: WeatherDataset(
            ds,
            layout,
            cfg.step_timedelta,
            cfg.splits[name].bounds,
            stats=stats,
            input_steps=cfg.input_steps,
            constants=constants,
            in_memory=in_memory,
            source=f"{path} [{name}]",
        )
        for name in (splits or list(cfg.splits))
    }
