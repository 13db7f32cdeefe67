"""Where the data of a command come from: the demo worlds, a WB2 store, the analysis beside a truth,
or the data a trained checkpoint was trained on. Every trainer and ``bdlens calibrate`` resolve
their data here, so that "the same data" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bdlens.configs import resolve_portable
from bdlens.data.normalization import NormStats, load_or_compute_stats
from bdlens.data.reader import open_dataset
from bdlens.data.splits import DataConfig
from bdlens.data.torch_dataset import WeatherDataset, make_datasets
from bdlens.errors import BdlensError


def resolve_data_path(world: str | Path) -> Path:
    """'demo' / 'small' → that demo world's truth store (built or reused from the cache); else a path,
    possibly as a manifest records it (:func:`bdlens.configs.portable_path`)."""
    if str(world) in ("demo", "small"):
        from bdlens.world.build import build

        return build(small=str(world) == "small") / "truth.zarr"
    path = resolve_portable(str(world))
    if not path.exists():
        raise BdlensError(f"world/data path {path} does not exist; use 'demo', 'small' or a WB2 zarr/netCDF path")
    return path


def analysis_path(truth_path: Path, given: str | Path | None = None) -> Path:
    """The analysis store: ``given``, else ``analysis.zarr`` beside a demo world's ``truth.zarr``."""
    return Path(given) if given else truth_path.parent / "analysis.zarr"


def analysis_dataset(train: WeatherDataset, data_config: DataConfig, truth_path: Path, given: str | Path | None = None) -> WeatherDataset:
    """The training split read from the analysis store (:func:`analysis_path`), with the truth's
    layout and normalisation; it must cover the same times."""
    path = analysis_path(truth_path, given)
    if not path.exists():
        raise BdlensError(f"analysis store {path} does not exist; pass the analysis of {truth_path} or set analysis_input_probability to 0")
    data = open_dataset(path, variables=list(train.layout.variables), levels=list(train.layout.levels))
    analysis = WeatherDataset(
        data, train.layout, data_config.step_timedelta, data_config.splits["train"].bounds, stats=train.stats,
        input_steps=data_config.input_steps, in_memory=True, source=f"{path} [train]",
    )
    if not np.array_equal(analysis.times, train.times):
        raise BdlensError(f"analysis {path} does not cover the same training times as {truth_path}")
    return analysis


def checkpoint_datasets(
    manifest: dict[str, Any], source: str | Path, world: str | None, splits: Sequence[str], made_by: str
) -> tuple[dict[str, WeatherDataset], DataConfig, Path]:
    """The splits of the data a checkpoint was trained on (in memory), its data config and data path.

    ``world`` overrides the data path recorded in the manifest; the normalisation statistics of the
    data found must be those the checkpoint was trained with. ``made_by`` names the command that
    writes such checkpoints (for the message when the manifest lacks what is needed).
    """
    if manifest.get("norm_stats") is None or "data_config" not in manifest:
        raise BdlensError(f"{source}/manifest.json lacks norm_stats or data_config; retrain it with `{made_by}`")
    data_config = DataConfig.model_validate(manifest["data_config"])
    world = world or manifest.get("training", {}).get("data_path")
    if world is None:
        raise BdlensError(f"{source} does not say which data it was trained on; pass --world")
    data_path = resolve_data_path(world)
    sets = make_datasets(data_config, data_path=data_path, splits=list(splits), in_memory=True)
    if sets[splits[0]].stats.key != manifest["norm_stats"].get("key"):
        raise BdlensError(
            f"the normalisation statistics of {data_path} differ from those {source} was trained with; pass the same --world"
        )
    return sets, data_config, data_path


def residual_stats(data_config: DataConfig, data_path: Path) -> NormStats:
    """Mean and std of the tendency X(t + Δ) − X(t) (Δ the config's step) over the training split,
    per variable and level: the scale of a residual target (diffusion). Cached beside the data as
    ``<data>.residual<Δ>.normstats.json``."""
    variables = data_config.upper_variables + data_config.surface_variables
    ds = open_dataset(data_path, variables=variables, levels=data_config.levels if data_config.upper_variables else None)
    hours = int(data_config.step_timedelta / np.timedelta64(1, "h"))
    path = data_path.with_name(f"{data_path.name}.residual{hours}h.normstats.json")
    return load_or_compute_stats(ds, path, data_config.splits["train"].bounds, variables, difference_step=data_config.step_timedelta)
