"""Loading trained 3DEST checkpoints, including the demo models bundled with the package (found by
:func:`bdlens.checkpoint.bundled_checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bdlens.checkpoint import load_state_into, load_weights, read_manifest
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.models.config import ModelConfig
from bdlens.models.transformer import EarthSpecificTransformer


@dataclass
class TrainedModel:
    """A 3DEST with what it needs to run on physical fields: its layout and normalisation statistics."""

    model: EarthSpecificTransformer
    layout: FieldLayout
    stats: NormStats
    manifest: dict
    source: Path

    @property
    def step_hours(self) -> int:
        """Δ of this model in hours."""
        return self.model.config.step_hours

    @torch.no_grad()
    def step(self, previous: Fields | None, current: Fields) -> Fields:
        """X_{t+Δ} from (X_{t−Δ}, X_t) in physical units; states are ``Fields`` with a batch dim."""
        norm = lambda f: None if f is None else self.layout.normalise(f, self.stats)  # noqa: E731
        upper, surface = self.model.step(norm(previous), norm(current))
        return self.layout.denormalise(Fields(upper, surface), self.stats)


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a deterministic checkpoint directory (``bdlens train deterministic`` output) in eval mode."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") != "deterministic":
        raise BdlensError(f"{path} holds a {manifest.get('kind')!r} checkpoint; a deterministic one is needed here")
    try:
        config = ModelConfig.from_manifest(manifest["model_config"], source=f"{path}/manifest.json")
        stats = NormStats.from_dict(manifest["norm_stats"])
    except (KeyError, ValueError) as err:
        raise BdlensError(f"{path}: manifest lacks a valid model_config or norm_stats ({err}); retrain or restore it") from err
    model = EarthSpecificTransformer(config)
    load_state_into(model, load_weights(path), path)
    model.to(device).eval()
    return TrainedModel(model, layout_of(config, path), stats, manifest, path)


def layout_of(config: ModelConfig, source: str | Path = "model") -> FieldLayout:
    """The field layout of a model config (its variables, levels and supported grid); ``source`` names it in errors."""
    grid = next((g for g in GRIDS.values() if (g.nlat, g.nlon) == (config.nlat, config.nlon)), None)
    if grid is None:
        raise BdlensError(f"{source}: model grid {config.nlon}x{config.nlat} is not a supported grid")
    return FieldLayout(config.upper_variables, config.levels, config.surface_variables, grid)
