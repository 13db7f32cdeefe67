"""``bdlens train deterministic``: the 3DEST on one step Δ, AdamW + cosine schedule, exact resume, DDP.

A run directory holds ``state.pt`` (model, optimiser, schedule, RNG and step, for exact resume; read
back with ``weights_only=True``), ``metrics.jsonl`` (training and validation log) and, at the end,
``checkpoint/`` (safetensors weights + manifest with config, normalisation statistics, provenance and
validation scores). Multi-process training: launch with ``torchrun`` (gloo, CPU processes).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdlens.checkpoint import save_checkpoint
from bdlens.configs import config_path
from bdlens.data import DataConfig, FieldLayout, Fields, NormStats, WeatherDataset, load_data_config, make_datasets
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.models.config import ModelConfig
from bdlens.models.loss import WeightedL1Loss
from bdlens.models.transformer import EarthSpecificTransformer, count_parameters
from bdlens.progress import bar
from bdlens.training.batches import analysis_choice, analysis_dataset, collate
from bdlens.training.config import TrainConfig
from bdlens.training.distributed import Distributed, batch_indices, optimizer_step
from bdlens.training.run import (
    CHECKPOINT,
    check_run_dir,
    create_run_dir,
    log_metrics,
    log_rank_agreement,
    read_metrics,
    read_state,
    restore,
    save_state,
    truncate_metrics,
)
from bdlens.training.schedule import lr_factor

log = logging.getLogger(__name__)


def resolve_data_path(world: str) -> Path:
    """'demo' / 'small' → that demo world's truth store (built or reused from the cache); else a path."""
    if world in ("demo", "small"):
        from bdlens.world.build import build

        return build(small=world == "small") / "truth.zarr"
    path = Path(world)
    if not path.exists():
        raise BdlensError(f"world/data path {path} does not exist; use 'demo', 'small' or a WB2 zarr/netCDF path")
    return path


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
    indices = np.linspace(0, len(setup.val) - 1, min(n_samples, len(setup.val))).round().astype(int).tolist()
    weights = torch.as_tensor(lat_weights(setup.layout.grid.latitudes()), dtype=torch.float32)[:, None]
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(indices), batch_size):
        (upper, surface), target = collate(setup.val, indices[start : start + batch_size])
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


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    config_file: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Train (or resume) a deterministic 3DEST into ``run_dir``; returns the final checkpoint dir."""
    dist_info = Distributed.from_env()
    dist_info.check_batch(cfg.batch_size)
    inputs = [config_file, config_path(cfg.model), config_path(cfg.data), None if cfg.world in ("demo", "small") else cfg.world]
    run_dir = check_run_dir(run_dir, resume, overwrite, dist_info.main, inputs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg)
    # The configs' content, not their paths: an edited data split or model size must not resume silently.
    depends = {"model config": json.loads(setup.model_config.model_dump_json()), "data config": json.loads(setup.data_config.model_dump_json())}
    create_run_dir(run_dir, "deterministic", dist_info)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = EarthSpecificTransformer(setup.model_config)
    loss_fn = WeightedL1Loss(setup.layout.grid.latitudes(), setup.layout.upper_variables, setup.layout.surface_variables)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    step, elapsed = 0, 0.0
    if resume:
        state = read_state(run_dir, cfg, "training", depends=depends)
        step, elapsed = restore(state, dist_info, model=model, optimizer=optimizer, scheduler=scheduler)
        log.info("resumed %s at step %d", run_dir, step)
    else:
        torch.manual_seed(cfg.seed + 1 + dist_info.rank)  # DropPath masks differ between ranks
    if dist_info.main:
        truncate_metrics(run_dir, step)
    if dist_info.main:
        log.info("model: %.2f M parameters; %d train / %d val samples", count_parameters(model) / 1e6, len(setup.train), len(setup.val))
    model.train()
    parameters = list(model.parameters())
    quiet_rank = {} if dist_info.main else {"disable": True}
    with bar(total=cfg.steps, initial=step, desc=f"train {cfg.step_hours}h", unit="step", **quiet_rank) as progress:
        while step < cfg.steps:
            tick = time.perf_counter()
            indices = batch_indices(step, len(setup.train), cfg.batch_size, cfg.seed, dist_info)
            analysis_inputs = None
            if setup.train_analysis is not None:
                choice = analysis_choice(cfg.seed, step, dist_info.rank, len(indices), setup.model_config.n_input_times, cfg.analysis_input_probability)
                analysis_inputs = (setup.train_analysis, choice)
            (upper, surface), target = collate(setup.train, indices, analysis_inputs)
            loss = loss_fn(model(upper, surface), (target.upper, target.surface))
            grad_norm = optimizer_step(loss, parameters, optimizer, scheduler, cfg.grad_clip, dist_info)
            step += 1
            elapsed += time.perf_counter() - tick
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if dist_info.main and (step % 10 == 0 or step == cfg.steps):
                log_metrics(run_dir, {"step": step, "loss": loss.item(), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "train_seconds": round(elapsed, 1)})
            if dist_info.main and (step % cfg.val_every == 0 or step == cfg.steps):
                log_metrics(run_dir, {"step": step, "val": validate(model, setup, cfg.val_samples, cfg.batch_size)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_state(run_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "step": step, "elapsed": elapsed}, cfg, dist_info, depends)
    log_rank_agreement(run_dir, model.parameters(), dist_info)
    if not dist_info.main:
        return run_dir / CHECKPOINT
    return _write_checkpoint(run_dir, model, setup, cfg, config_file, command, elapsed)


def _write_checkpoint(
    run_dir: Path, model: torch.nn.Module, setup: Setup, cfg: TrainConfig, config_file: Path | None, command: str | None, elapsed: float
) -> Path:
    val = [r for r in read_metrics(run_dir) if "val" in r]
    manifest = {
        "kind": "deterministic",
        "model_config": json.loads(setup.model_config.model_dump_json()),
        "data_config": json.loads(setup.data_config.model_dump_json()),
        "norm_stats": setup.stats.to_dict(),
        "training": {
            "command": command,
            "config_file": str(config_file) if config_file else None,
            "config": json.loads(cfg.model_dump_json()),
            "seed": cfg.seed,
            "steps": cfg.steps,
            "train_seconds": round(elapsed, 1),
            "data_path": str(setup.data_path),
            "parameters": count_parameters(model),
        },
        "validation": val[-1]["val"] if val else {},
    }
    return save_checkpoint(run_dir / CHECKPOINT, model.state_dict(), manifest)
