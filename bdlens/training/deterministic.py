"""``bdlens train deterministic``: the 3DEST on one step Δ, AdamW + cosine schedule, on the one loop.

The run directory, exact resume and DDP are :func:`bdlens.training.loop.run`'s: ``state.pt`` holds the
model, optimiser, schedule, every rank's RNG and the step; ``metrics.jsonl`` the training log (every
10 steps) and validation (RMSE per variable and level in physical units, beside persistence);
``checkpoint/`` the safetensors weights and a manifest with config, normalisation statistics,
provenance and the last validation scores. Multi-process training: ``torchrun`` (nccl on GPUs, gloo
on CPUs); the device, bf16 autocast and DataLoader workers are the config's
:class:`~bdlens.training.config.ExecutionSettings` (docs/gpu.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdlens.checkpoint import save_checkpoint
from bdlens.configs import config_path, portable_path
from bdlens.data import (
    DataConfig,
    FieldLayout,
    Fields,
    NormStats,
    WeatherDataset,
    analysis_dataset,
    load_data_config,
    make_datasets,
    resolve_data_path,
)
from bdlens.devices import autocast, to_device
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.models.config import ModelConfig
from bdlens.models.loss import WeightedL1Loss
from bdlens.models.transformer import EarthSpecificTransformer, count_parameters
from bdlens.training.batches import BatchLoader, collate, seeded_batch
from bdlens.training.config import TrainConfig, execution_fields
from bdlens.training.distributed import Distributed, optimizer_step
from bdlens.training.loop import Cadence, Objective, run
from bdlens.training.run import check_run_dir, read_metrics
from bdlens.training.schedule import lr_factor

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything a training run needs, built from a :class:`TrainConfig`."""

    model_config: ModelConfig
    data_config: DataConfig
    data_path: Path
    layout: FieldLayout
    stats: NormStats
    train: WeatherDataset
    val: WeatherDataset
    train_analysis: WeatherDataset | None = None


def prepare(cfg: TrainConfig) -> Setup:
    """Load and cross-check the model and data configs, open the data and the two splits."""
    model_config = ModelConfig.from_yaml(config_path(cfg.model)).model_copy(update={"step_hours": cfg.step_hours})
    data_config = load_data_config(config_path(cfg.data)).model_copy(
        update={"step": np.timedelta64(cfg.step_hours, "h").astype("timedelta64[s]").item(), "input_steps": model_config.n_input_times}
    )
    for field in ("upper_variables", "surface_variables", "levels"):
        if list(getattr(model_config, field)) != list(getattr(data_config, field)):
            raise BdlensError(
                f"model config {cfg.model} and data config {cfg.data} disagree on {field}: "
                f"{list(getattr(model_config, field))} vs {list(getattr(data_config, field))}"
            )
    data_path = resolve_data_path(cfg.world)
    sets = make_datasets(data_config, data_path=data_path, splits=["train", "val"], in_memory=True)
    train, val = sets["train"], sets["val"]
    if len(train) < cfg.batch_size:
        raise BdlensError(f"the train split has {len(train)} samples, fewer than batch_size {cfg.batch_size}")
    if len(val) == 0:
        raise BdlensError("the val split has no samples for this step; widen it in the data config")
    train_analysis = analysis_dataset(train, data_config, data_path, cfg.analysis) if cfg.analysis_input_probability > 0 else None
    return Setup(model_config, data_config, data_path, train.layout, train.stats, train, val, train_analysis)


@torch.no_grad()
def validate(model: torch.nn.Module, setup: Setup, n_samples: int, batch_size: int) -> dict[str, float]:
    """Latitude-weighted RMSE per variable and level in physical units (``<var>_<level>`` keys) and
    the same for persistence, over ``n_samples`` evenly spaced validation samples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices = np.linspace(0, len(setup.val) - 1, min(n_samples, len(setup.val))).round().astype(int).tolist()
    weights = torch.as_tensor(lat_weights(setup.layout.grid.latitudes()), dtype=torch.float32, device=device)[:, None]
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(indices), batch_size):
        (upper, surface), target = to_device(collate(setup.val, indices[start : start + batch_size]), device)
        pred = Fields(*model(upper, surface))
        truth = setup.layout.denormalise(target, setup.stats)
        persistence = setup.layout.denormalise(Fields(upper[:, -1], surface[:, -1]), setup.stats)
        for label, forecast in (("model", setup.layout.denormalise(pred, setup.stats)), ("persistence", persistence)):
            se_upper = ((forecast.upper - truth.upper) ** 2 * weights).mean(dim=(-1, -2)).sum(0)  # (V, Z)
            se_surface = ((forecast.surface - truth.surface) ** 2 * weights).mean(dim=(-1, -2)).sum(0)  # (V,)
            sums[label + "_upper"] = sums.get(label + "_upper", 0) + se_upper
            sums[label + "_surface"] = sums.get(label + "_surface", 0) + se_surface
    model.train(was_training)
    scores: dict[str, float] = {}
    for label, prefix in (("model", ""), ("persistence", "persistence/")):
        mse = torch.cat([sums[f"{label}_upper"].flatten(), sums[f"{label}_surface"]]) / len(indices)  # channel order
        scores.update({prefix + name: float(value.sqrt()) for name, value in zip(setup.layout.channel_names, mse, strict=True)})
    return scores


class DeterministicObjective(Objective):
    """The weighted L1 loss of one step Δ, AdamW with warm-up and cosine decay (docs/science.md §3)."""

    description = "train deterministic"
    may_change = execution_fields()

    def __init__(self, cfg: TrainConfig, setup: Setup, dist_info: Distributed, config_file: Path | None, command: str | None) -> None:
        self.config, self.setup, self.dist_info = cfg, setup, dist_info
        self.config_file, self.command = config_file, command
        self.description = f"train {cfg.step_hours}h"
        self.cadence = Cadence(cfg.steps, log_every=10, validate_every=cfg.val_every, checkpoint_every=cfg.checkpoint_every)
        device = dist_info.device
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (made on the CPU: the same on every device)
        self.model = EarthSpecificTransformer(setup.model_config).train().to(device)
        layout = setup.layout
        self.loss_fn = WeightedL1Loss(layout.grid.latitudes(), layout.upper_variables, layout.surface_variables).to(device)
        self.batches = BatchLoader(partial(training_batch, setup, cfg, dist_info=dist_info), cfg.steps, cfg.loader_workers, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
        if dist_info.main:
            log.info("model: %.2f M parameters; %d train / %d val samples", count_parameters(self.model) / 1e6, len(setup.train), len(setup.val))

    def stateful(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def fresh_start(self, dist_info: Distributed) -> None:
        torch.manual_seed(self.config.seed + 1 + dist_info.rank)  # DropPath masks differ between ranks

    def train_step(self, step: int) -> dict[str, float]:
        (upper, surface), target = self.batches(step)
        with autocast(self.dist_info.device, self.config.precision):
            loss = self.loss_fn(self.model(upper, surface), (target.upper, target.surface))
        grad_norm = optimizer_step(loss, list(self.model.parameters()), self.optimizer, self.scheduler, self.config.grad_clip, self.dist_info)
        return {"loss": loss.item(), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> list[dict[str, Any]]:
        return [{"val": validate(self.model, self.setup, self.config.val_samples, self.config.batch_size)}]

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.model.parameters()

    def save(self, directory: Path, summary: dict[str, Any]) -> Path:
        return save_checkpoint(directory, self.model.state_dict(), training_manifest(
            "deterministic", self.model, self.setup, self.config, self.config_file, self.command, summary, directory.parent,
        ))


def training_batch(setup: Setup, cfg: TrainConfig, step: int, dist_info: Distributed) -> tuple[Fields, Fields]:
    """This rank's (inputs, targets) at ``step``: the step's seeded batch, inputs from the analysis
    with ``cfg.analysis_input_probability`` per input time (:func:`~bdlens.training.batches.seeded_batch`)."""
    return seeded_batch(step, setup.train, cfg.batch_size, cfg.seed, dist_info, setup.train_analysis, cfg.analysis_input_probability,
                        setup.model_config.n_input_times)


def training_manifest(
    kind: str, model: torch.nn.Module, setup: Setup, cfg: TrainConfig, config_file: Path | None, command: str | None,
    summary: dict[str, Any], run_dir: Path,
) -> dict[str, Any]:
    """The manifest of a model trained from a :class:`TrainConfig`: model and data configs, norm
    stats, provenance, and the last validation scores of the run."""
    val = [r for r in read_metrics(run_dir) if "val" in r]
    return {
        "kind": kind,
        "model_config": json.loads(setup.model_config.model_dump_json()),
        "data_config": json.loads(setup.data_config.model_dump_json()),
        "norm_stats": setup.stats.to_dict(),
        "training": {
            "command": command,
            "config_file": portable_path(config_file) if config_file else None,
            "config": json.loads(cfg.model_dump_json()),
            "seed": cfg.seed,
            "steps": cfg.steps,
            "train_seconds": summary["train_seconds"],
            "data_path": portable_path(setup.data_path),
            "parameters": count_parameters(model),
        },
        "validation": val[-1]["val"] if val else {},
    }


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    config_file: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    objective: type[Objective] | None = None,
) -> Path:
    """Train (or resume) a deterministic 3DEST into ``run_dir``; returns the final checkpoint dir.

    ``objective``: another objective built like :class:`DeterministicObjective` from the config and
    its :class:`Setup` (the diffusion baseline), default the deterministic one."""
    dist_info = Distributed.from_env(cfg.device)
    dist_info.check_batch(cfg.batch_size)
    inputs = [config_file, config_path(cfg.model), config_path(cfg.data), None if cfg.world in ("demo", "small") else cfg.world]
    run_dir = check_run_dir(run_dir, resume, overwrite, dist_info.main, inputs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg)
    trainer = (objective or DeterministicObjective)(cfg, setup, dist_info, config_file, command)
    # The configs' content, not their paths: an edited data split or model size must not resume silently.
    trainer.depends = {"model config": json.loads(setup.model_config.model_dump_json()),
                       "data config": json.loads(setup.data_config.model_dump_json())}
    return run(trainer, run_dir, dist_info, resume)
