"""Data layer: read WB2/ERA5-layout files, normalise, convert to tensors, and serve training samples.

* :func:`open_dataset` — any WB2/ERA5 zarr or netCDF → lazy canonical Dataset (docs/science.md §1);
  :func:`check_finite` — NaN/inf scan, one lazy pass.
* :class:`NormStats`, :func:`compute_stats`, :func:`load_or_compute_stats` — latitude-weighted
  mean/std per variable and level over the training period, cached with a key.
* :class:`FieldLayout`, :class:`Fields` — the single xarray ⇄ torch conversion
  (upper (B, V, Z, H, W), surface (B, V, H, W)).
* :class:`WeatherDataset`, :func:`make_datasets`, :class:`DataConfig`, :func:`load_data_config` —
  ((X_{t−Δ}, X_t), X_{t+Δ}) samples split by time ranges from a YAML config.
* :func:`resolve_data_path`, :func:`analysis_dataset`, :func:`checkpoint_datasets` — where a
  command's data come from (demo world, store, analysis, the data of a trained checkpoint).
"""

from bdlens.data.normalization import NormStats, compute_stats, default_stats_path, load_or_compute_stats, stats_key
from bdlens.data.reader import check_finite, missing_times, open_dataset, time_step
from bdlens.data.sources import analysis_dataset, analysis_path, checkpoint_datasets, residual_stats, resolve_data_path
from bdlens.data.splits import DataConfig, TimeRange, load_data_config
from bdlens.data.tensors import FieldLayout, Fields, NormTensors, stack_times
from bdlens.data.torch_dataset import WeatherDataset, make_datasets

__all__ = [
    "DataConfig",
    "FieldLayout",
    "Fields",
    "NormStats",
    "NormTensors",
    "TimeRange",
    "WeatherDataset",
    "analysis_dataset",
    "analysis_path",
    "check_finite",
    "checkpoint_datasets",
    "compute_stats",
    "default_stats_path",
    "load_data_config",
    "load_or_compute_stats",
    "make_datasets",
    "missing_times",
    "open_dataset",
    "residual_stats",
    "resolve_data_path",
    "stack_times",
    "stats_key",
    "time_step",
]
