"""``bdlens train diffusion``: the conditional EDM baseline on the 3DEST backbone (docs/science.md §8), on the one loop.

Each optimiser step takes the step's seeded batch of ((X_{t−Δ}, X_t), X_{t+Δ}) samples (inputs from
the analysis with ``analysis_input_probability``, as for the deterministic model), turns the target
into a residual y in residual units (:class:`~bdlens.models.diffusion.ResidualScaling`), draws
ln σ ~ N(P_mean, P_std²) and n ~ N(0, I) per sample, and minimises the latitude- and
variable-weighted (Pangu's weights, surface × 0.25) squared error λ(σ)·‖D(y + σn; σ) − y‖² of the
preconditioned denoiser (:class:`~bdlens.models.diffusion.Denoiser`), with AdamW, warm-up and cosine
decay. Validation samples ``validation.members`` members with the Heun sampler of ``sampler`` from
``val_samples`` validation forecasts and reports per lead the fair CRPS, ensemble-mean RMSE, spread
and corrected spread-skill (normalised, all channels; per variable and level in physical units),
with the network evaluations and the wall time per member-step.

The checkpoint (``kind: "diffusion"``) holds the denoiser, the forecast model's config, the EDM and
default sampler settings, the state and the residual (tendency) normalisation statistics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from bdlens.checkpoint import save_checkpoint
from bdlens.data import Fields, residual_stats
from bdlens.devices import autocast, to_device
from bdlens.models import WeightedL1Loss
from bdlens.models.diffusion import (
    KIND,
    Denoiser,
    DiffusionEnsemble,
    DiffusionSampler,
    EDMSettings,
    ResidualScaling,
    SamplerSettings,
    loss_weight,
)
from bdlens.training.batches import BatchLoader, latitudes
from bdlens.training.config import TrainConfig, execution_fields
from bdlens.training.deterministic import Setup, train, training_batch, training_manifest
from bdlens.training.distributed import Distributed, optimizer_step
from bdlens.training.ensemble_validation import ensemble_scores, reported
from bdlens.training.loop import Cadence, Objective
from bdlens.training.run import last_validation
from bdlens.training.schedule import lr_factor


class DiffusionValidation(BaseModel):
    """Members per validation forecast, the leads (model steps), the seed and forecasts per batch
    (how many forecasts: ``val_samples``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: int = Field(default=4, gt=1)
    leads: tuple[int, ...] = (1, 4)
    seed: int = 12345
    batch_size: int = Field(default=4, gt=0)


class DiffusionConfig(TrainConfig):
    """The deterministic trainer's settings (model, data, world, optimisation, cadence) plus the EDM
    settings, the sampler used for validation (and by default for forecasts) and the validation ensemble."""

    edm: EDMSettings = EDMSettings()
    sampler: SamplerSettings = SamplerSettings()
    validation: DiffusionValidation = DiffusionValidation()


class DenoisingLoss(WeightedL1Loss):
    """mean_b λ_b·[mean(w_v w_lat (D − y)²)_upper + surface_factor · mean(w_v w_lat (D − y)²)_surface],
    with the weights of its parent :class:`bdlens.models.WeightedL1Loss` (residual units)."""

    def forward(self, denoised: Fields, target: Fields, weight: Tensor) -> Tensor:
        """denoised, target: Fields (B, …); weight: λ(σ) per sample (B,) → scalar."""
        lat = self.latitude_weight[:, None]
        upper = ((denoised.upper - target.upper) ** 2 * lat * self.upper_weight[:, None, None, None]).flatten(1).mean(1)
        surface = ((denoised.surface - target.surface) ** 2 * lat * self.surface_weight[:, None, None]).flatten(1).mean(1)
        return (weight * (upper + self.surface_factor * surface)).mean()


class DiffusionObjective(Objective):
    """Denoising score matching of the EDM denoiser (see the module docstring)."""

    description = "train diffusion"
    may_change = execution_fields()

    def __init__(self, cfg: DiffusionConfig, setup: Setup, dist_info: Distributed, config_file: Path | None, command: str | None) -> None:
        self.config, self.setup, self.dist_info, self.config_file, self.command = cfg, setup, dist_info, config_file, command
        self.cadence = Cadence(cfg.steps, log_every=10, validate_every=cfg.val_every, checkpoint_every=cfg.checkpoint_every)
        device = dist_info.device
        self.residual_stats = residual_stats(setup.data_config, setup.data_path)
        self.scaling = ResidualScaling(setup.layout, setup.stats, self.residual_stats).to(device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.denoiser = Denoiser(setup.model_config, cfg.edm).train().to(device)
        self.loss_fn = DenoisingLoss(setup.layout.grid.latitudes(), setup.layout.upper_variables, setup.layout.surface_variables).to(device)
        self.constants = to_device(setup.train.constants, device)
        self.batches = BatchLoader(partial(training_batch, setup, cfg, dist_info=dist_info), cfg.steps, cfg.loader_workers, device)
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))

    def stateful(self) -> dict[str, Any]:
        return {"denoiser": self.denoiser, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def fresh_start(self, dist_info: Distributed) -> None:
        torch.manual_seed(self.config.seed + 1 + dist_info.rank)  # noise levels, noise and DropPath differ between ranks

    def train_step(self, step: int) -> dict[str, float]:
        (upper, surface), target = self.batches(step)
        condition = [Fields(upper[:, t], surface[:, t]) for t in range(upper.shape[1])]
        clean = self.scaling.to_residual(condition[-1], target)
        edm = self.config.edm
        # σ from the CPU generator (as before GPUs), the noise from the generator of the batch's device.
        sigma = (edm.log_sigma_mean + edm.log_sigma_std * torch.randn(upper.shape[0])).exp().to(upper.device)
        noisy = Fields(*(x + sigma.reshape(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x) for x in clean))
        with autocast(self.dist_info.device, self.config.precision):
            denoised = self.denoiser(noisy, sigma, condition, self.constants)
            loss = self.loss_fn(denoised, clean, loss_weight(sigma, edm.sigma_data))
        parameters = list(self.denoiser.parameters())
        grad_norm = optimizer_step(loss, parameters, self.optimizer, self.scheduler, self.config.grad_clip, self.dist_info)
        return {"loss": loss.item(), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> list[dict[str, Any]]:
        rows, seconds, member_steps = validate(self.denoiser, self.scaling, self.setup, self.config, self.dist_info.device)
        extra = {"network_evaluations_per_member_step": self.config.sampler.network_evaluations, "seconds_per_member_step": seconds / member_steps}
        return [{"split": "val", **row, **extra} for row in rows]

    def parameters(self) -> Iterable[Tensor]:
        return self.denoiser.parameters()

    def save(self, directory: Path, summary: dict[str, Any]) -> Path:
        cfg = self.config
        manifest = training_manifest(KIND, self.denoiser, self.setup, cfg, self.config_file, self.command, summary, directory.parent)
        manifest |= {
            "edm": cfg.edm.model_dump(mode="json"), "sampler": json.loads(cfg.sampler.model_dump_json()),
            "residual_stats": self.residual_stats.to_dict(), "validation": last_validation(directory.parent),
        }
        return save_checkpoint(directory, self.denoiser.state_dict(), manifest)


def validate(
    denoiser: Denoiser, scaling: ResidualScaling, setup: Setup, cfg: DiffusionConfig, device: torch.device | str = "cpu"
) -> tuple[list[dict[str, Any]], float, int]:
    """Per-lead :func:`ensemble_scores` of ``cfg.validation.members`` diffusion members on ``cfg.val_samples``
    validation forecasts (on ``device``, where the denoiser and ``scaling`` are); also the wall time (s)
    and the number of member-steps it took."""
    settings = cfg.validation
    was_training = denoiser.training
    denoiser.eval()
    sampler = DiffusionSampler(denoiser, scaling, cfg.sampler, settings.seed, to_device(setup.val.constants, torch.device(device)))
    ensemble = DiffusionEnsemble(sampler, settings.members)
    tick = time.perf_counter()
    rows = ensemble_scores(ensemble, setup.val, settings.leads, cfg.val_samples, settings.batch_size, latitudes(denoiser, setup.val),
                           per_variable=True, device=device)
    seconds = time.perf_counter() - tick
    denoiser.train(was_training)
    return reported(rows), seconds, rows[0]["forecasts"] * settings.members * max(settings.leads)


def train_diffusion(cfg: DiffusionConfig, run_dir: str | Path, **options: Any) -> Path:
    """Train (or resume) the diffusion denoiser into ``run_dir``; returns the final checkpoint dir.
    ``options``: those of :func:`bdlens.training.deterministic.train` (config_file, resume, overwrite, command)."""
    return train(cfg, run_dir, objective=DiffusionObjective, **options)
