"""``bdlens train deterministic``: the 3DEST on one step Δ, AdamW + cosine schedule, exact resume, DDP.

A run directory holds ``state.pt`` (model, optimiser, schedule, RNG and step, for exact resume; read
back with ``weights_only=True``), ``metrics.jsonl`` (training and validation log) and, at the end,
``checkpoint/`` (safetensors weights + manifest with config, normalisation statistics, provenance and
validation scores). Multi-process training: launch with ``torchrun``; gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from bdlens.checkpoint import save_checkpoint
from bdlens.configs import config_path
from bdlens.data import DataConfig, FieldLayout, Fields, NormStats, WeatherDataset, load_data_config, make_datasets, open_dataset
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.models.config import ModelConfig
from bdlens.models.loss import WeightedL1Loss
from bdlens.models.transformer import EarthSpecificTransformer, count_parameters
from bdlens.progress import bar
from bdlens.training.config import TrainConfig
from bdlens.training.state import STATE, read_training_state

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world_size)

    @property
    def main(self) -> bool:
        return self.rank == 0


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
    train_analysis = None
    if cfg.analysis_input_probability > 0:
        analysis_path = Path(cfg.analysis) if cfg.analysis else data_path.parent / "analysis.zarr"
        analysis = open_dataset(analysis_path, variables=list(train.layout.variables), levels=list(train.layout.levels))
        train_analysis = WeatherDataset(
            analysis, train.layout, data_config.step_timedelta, data_config.splits["train"].bounds, stats=train.stats,
            input_steps=data_config.input_steps, in_memory=True, source=f"{analysis_path} [train]",
        )
        if not np.array_equal(train_analysis.times, train.times):
            raise BdlensError(f"analysis {analysis_path} does not cover the same training times as {data_path}")
    return Setup(model_config, data_config, data_path, train.layout, train.stats, train, val, train_analysis)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n_samples: int, batch_size: int, seed: int, dist_info: Distributed) -> list[int]:
    """This rank's sample indices for global ``step``: a seeded permutation per epoch, so resuming
    at any step replays exactly the same batches."""
    per_epoch = n_samples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    batch = order[position * batch_size : (position + 1) * batch_size]
    return batch[dist_info.rank :: dist_info.world_size].tolist()


def collate(
    dataset: WeatherDataset, indices: list[int], analysis_inputs: tuple[WeatherDataset, torch.Tensor] | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], Fields]:
    """Model inputs (upper (B, T_in, V, Z, H, W), surface (B, T_in, V, H, W)) and the target Fields.

    ``analysis_inputs`` = (analysis dataset, boolean (B, T_in) choice): where the choice is true the
    input time is taken from the analysis (truth + analysis error) instead of the truth, so the model
    learns to forecast from imperfect initial states (and from its own imperfect earlier steps).
    """
    inputs, target = default_collate([dataset[i] for i in indices])
    upper, surface = torch.stack([x.upper for x in inputs], 1), torch.stack([x.surface for x in inputs], 1)
    if analysis_inputs is not None:
        analysis, choice = analysis_inputs
        noisy, _ = default_collate([analysis[i] for i in indices])
        pick = choice[:, :, None, None, None]
        upper = torch.where(pick[..., None], torch.stack([x.upper for x in noisy], 1), upper)
        surface = torch.where(pick, torch.stack([x.surface for x in noisy], 1), surface)
    return (upper, surface), Fields(*target)


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
    for label in ("model", "persistence"):
        prefix = "" if label == "model" else "persistence/"
        upper, surface = (sums[f"{label}_{part}"] / len(indices) for part in ("upper", "surface"))
        for v, name in enumerate(setup.layout.upper_variables):
            for z, level in enumerate(setup.layout.levels):
                scores[f"{prefix}{name}_{level}"] = float(upper[v, z].sqrt())
        for v, name in enumerate(setup.layout.surface_variables):
            scores[f"{prefix}{name}"] = float(surface[v].sqrt())
    return scores


def _log_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / METRICS).open("a") as fh:
        fh.write(json.dumps(record) + "\n")


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
    run_dir = Path(run_dir)
    if dist_info.main:
        if run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite):
            raise BdlensError(f"run directory {run_dir} is not empty; pass --resume to continue it or --overwrite to start over")
        if overwrite and not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = EarthSpecificTransformer(setup.model_config)
    loss_fn = WeightedL1Loss(setup.layout.grid.latitudes(), setup.layout.upper_variables, setup.layout.surface_variables)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    step, elapsed = 0, 0.0
    if resume:
        state = read_training_state(run_dir, cfg, "training")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        torch.set_rng_state(state["torch_rng"][dist_info.rank])
        log.info("resumed %s at step %d", run_dir, step)
    else:
        torch.manual_seed(cfg.seed + 1 + dist_info.rank)  # DropPath masks differ between ranks
    net = torch.nn.parallel.DistributedDataParallel(model) if dist_info.world_size > 1 else model
    if dist_info.main:
        log.info("model: %.2f M parameters; %d train / %d val samples", count_parameters(model) / 1e6, len(setup.train), len(setup.val))
    model.train()
    quiet_rank = {} if dist_info.main else {"disable": True}
    with bar(total=cfg.steps, initial=step, desc=f"train {cfg.step_hours}h", unit="step", **quiet_rank) as progress:
        while step < cfg.steps:
            tick = time.perf_counter()
            indices = batch_indices(step, len(setup.train), cfg.batch_size, cfg.seed, dist_info)
            analysis_inputs = None
            if setup.train_analysis is not None:
                draw = torch.Generator().manual_seed(cfg.seed * 7_919 + step * 104_729 + dist_info.rank)
                choice = torch.rand(len(indices), setup.model_config.n_input_times, generator=draw) < cfg.analysis_input_probability
                analysis_inputs = (setup.train_analysis, choice)
            (upper, surface), target = collate(setup.train, indices, analysis_inputs)
            loss = loss_fn(net(upper, surface), (target.upper, target.surface))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed += time.perf_counter() - tick
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if dist_info.main and (step % 10 == 0 or step == cfg.steps):
                _log_metrics(run_dir, {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "train_seconds": round(elapsed, 1)})
            if dist_info.main and (step % cfg.val_every == 0 or step == cfg.steps):
                _log_metrics(run_dir, {"step": step, "val": validate(model, setup, cfg.val_samples, cfg.batch_size)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(run_dir, model, optimizer, scheduler, step, elapsed, cfg, dist_info)
    if dist_info.world_size > 1:
        _record_rank_agreement(model, run_dir, dist_info)
    if not dist_info.main:
        return run_dir / CHECKPOINT
    return _write_checkpoint(run_dir, model, setup, cfg, config_file, command, elapsed)


def _save_state(run_dir: Path, model, optimizer, scheduler, step: int, elapsed: float, cfg: TrainConfig, dist_info: Distributed) -> None:
    rng = torch.get_rng_state()
    if dist_info.world_size > 1:
        gathered = [torch.empty_like(rng) for _ in range(dist_info.world_size)]
        dist.all_gather(gathered, rng)
        rng_states = gathered
    else:
        rng_states = [rng]
    if not dist_info.main:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "torch_rng": rng_states,
        "config": cfg.model_dump_json(),
    }
    tmp = run_dir / f".{STATE}.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE)


def _record_rank_agreement(model: torch.nn.Module, run_dir: Path, dist_info: Distributed) -> None:
    """Log the largest weight difference between any rank and rank 0 (DDP must keep it at 0)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, flat)
    if dist_info.main:
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        _log_metrics(run_dir, {"ranks": dist_info.world_size, "max_weight_difference_between_ranks": diff})


def _write_checkpoint(
    run_dir: Path, model: torch.nn.Module, setup: Setup, cfg: TrainConfig, config_file: Path | None, command: str | None, elapsed: float
) -> Path:
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    val = [r for r in records if "val" in r]
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
