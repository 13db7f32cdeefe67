"""Learned flow-dependent perturbation network, trained with fair CRPS (SPEC §5).

A small 3DEST (:class:`PerturbationNetwork`, its own :class:`~bdlens.models.ModelConfig` on the
backbone's variables, levels and grid) maps the latest input state(s) to a mean μ and a standard
deviation σ = softplus(ρ) per grid point, variable and level (normalised units). At every model step
the most recent input state is perturbed,

    X_t' = X_t + μ(X) + s·σ(X) ⊙ ε,    ε ~ N(0, I),

and the frozen backbone steps from (X_{t−Δ}, X_t'). Because μ and σ are recomputed from the current
state, the perturbation follows the flow. ``s`` is the calibrated amplitude (1 when trained).
The network starts harmless: its output convolutions are scaled by ``init_scale`` and the ρ bias
set so that μ ≈ 0 and σ ≈ ``init_sigma`` everywhere.

Ensembles (:class:`PerturbedEnsemble`, normalised units; :class:`LearnedPerturbationStep`, physical
units, for :func:`bdlens.models.lead_time.rollout`): member k has posterior weight sample θ_k (drawn
from (seed, k), fixed for the rollout, as in :class:`~bdlens.bayes.PosteriorEnsemble`) and its own
noise: ε for member k of the forecast with *init key* i at step s comes from a generator seeded by
(seed, i, k, s) alone (:func:`bdlens.perturbation.patterns.member_generator`, stream
``learned-perturbation``), so a member's forecast does not depend on which other members or which
other initial times share its batch, nor on the batch size. The init keys of a batch are set by
``start(init_keys)`` (:func:`bdlens.forecast._run` passes the init times in hours since 1970);
without it they are the positions 0..B−1 in the batch (training and validation). The step counter
restarts at ``start`` and whenever a rollout starts from a state shared by all members (the analysis).

Training (:func:`train_perturbation`, ``bdlens train perturb``): the backbone and the posterior are
frozen; each training sample rolls out M members (weights ``sample_weights(bayes, M, seed_t)`` with
a fresh seed per optimiser step, held fixed over the rollout) for n steps, and the loss is the fair
CRPS (:func:`fair_crps`) of the M members against the truth at every lead 1..n, latitude- and
variable-weighted like the backbone's L1 loss (SPEC §3: with one member the fair-CRPS kernel
becomes |x − y|), averaged over the leads. Gradients flow through the frozen backbone into the
perturbation network only. The rollout length n follows an autoregressive curriculum
(:func:`curriculum_rollout`): 1 step for the first ``steps_per_stage`` optimiser steps, then 2, …,
up to ``max_rollout`` (4). Conveniences as in the deterministic trainer: AdamW with warm-up and
cosine decay, a seeded batch order per epoch, ``state.pt`` for exact resume (read with
``weights_only=True``), ``metrics.jsonl``, a progress bar and periodic validation of the fair CRPS
and the corrected spread-skill ratio per lead (:func:`ensemble_scores`).

Checkpoint: ``<run>/checkpoint`` with ``model.safetensors`` and a manifest of ``kind:
"perturbation"``, the network's model config and init settings, the norm stats, the backbone (VI)
checkpoint it was trained with, and provenance. A ``calibration.json`` beside it (written by
``bdlens calibrate``) sets the default amplitude and posterior temperature of
:class:`LearnedPerturbationStep`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from bdlens.bayes.posterior import BayesianTransformer, inverse_softplus
from bdlens.bayes.sampling import PosteriorEnsemble
from bdlens.bayes.trainer import ValidationSettings, latitudes
from bdlens.checkpoint import load_state_into, load_weights, read_manifest, save_checkpoint
from bdlens.configs import YamlConfig
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.forecast import PosteriorStep
from bdlens.models import EarthSpecificTransformer, ModelConfig, WeightedL1Loss
from bdlens.models.layers import PatchRecovery
from bdlens.perturbation.initial import member_noise
from bdlens.perturbation.patterns import init_keys_for, members_tuple
from bdlens.progress import bar
from bdlens.training.batches import collate_states, collate_targets, lead_targets
from bdlens.training.distributed import Distributed, average_scalar, batch_indices, optimizer_step
from bdlens.training.ensemble_validation import ensemble_scores, fair_crps
from bdlens.training.run import (
    CHECKPOINT,
    last_validation,
    log_metrics,
    log_rank_agreement,
    read_state,
    restore,
    save_state,
    truncate_metrics,
)
from bdlens.training.schedule import lr_factor

log = logging.getLogger(__name__)

KIND = "perturbation"
FORMAT_VERSION = 1
NOISE_STREAM = "learned-perturbation"
CALIBRATION = "calibration.json"

State = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# Fair CRPS as a differentiable loss (the estimator itself: bdlens.training.ensemble_validation.fair_crps)


class EnsembleCRPSLoss(WeightedL1Loss):
    """Fair CRPS of an M-member ensemble, weighted like its parent :class:`bdlens.models.WeightedL1Loss`:

    loss = mean(w_v · w_lat · CRPS)_upper + surface_factor · mean(w_v · w_lat · CRPS)_surface

    with cell-area latitude weights (mean 1) and Pangu's variable weights; normalised units.
    """

    def forward(self, ensemble: State, truth: State) -> Tensor:
        """ensemble: upper (M, B, V_u, Z, H, W), surface (M, B, V_s, H, W); truth without M → scalar."""
        lat = self.latitude_weight[:, None]
        upper = fair_crps(ensemble[0], truth[0]) * lat * self.upper_weight[:, None, None, None]
        surface = fair_crps(ensemble[1], truth[1]) * lat * self.surface_weight[:, None, None]
        return upper.mean() + self.surface_factor * surface.mean()


# ----------------------------------------------------------------------------------------------
# The network


class NetworkSettings(BaseModel):
    """Sizes of the perturbation 3DEST (variables, levels and grid come from the backbone) and its start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(default=16, gt=0)
    depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    heads: tuple[int, int, int, int] = (1, 2, 2, 1)
    window: tuple[int, int, int] | None = None
    patch: tuple[int, int, int] | None = None
    n_input_times: int = Field(default=1, ge=1, le=2)
    mlp_ratio: float = Field(default=2.0, gt=0)
    init_sigma: float = Field(default=0.02, gt=0, description="σ everywhere at the start, normalised units")
    init_scale: float = Field(default=0.01, gt=0, description="factor on the output convolutions' initial weights")

    def model_config_for(self, backbone: ModelConfig) -> ModelConfig:
        """The network's :class:`ModelConfig`: the backbone's fields and grid with these sizes
        (window and patch default to the backbone's)."""
        if self.n_input_times > backbone.n_input_times:
            raise BdlensError(
                f"the perturbation network cannot take {self.n_input_times} input times: the backbone only gets {backbone.n_input_times}"
            )
        data = backbone.model_dump() | {
            "embed_dim": self.embed_dim, "depths": self.depths, "heads": self.heads, "n_input_times": self.n_input_times,
            "mlp_ratio": self.mlp_ratio, "window": self.window or backbone.window, "patch": self.patch or backbone.patch,
            "drop_path": 0.0, "residual": False, "checkpoint": False,
        }
        return ModelConfig.from_dict(data, source="perturbation network")


class PerturbationNetwork(nn.Module):
    """A 3DEST whose output holds (μ, ρ) for every variable and level; σ = softplus(ρ).

    Inputs as :class:`~bdlens.models.EarthSpecificTransformer` (normalised, (N, T_in, …)); see
    :meth:`forward` and :meth:`perturb`.
    """

    def __init__(self, config: ModelConfig, init_sigma: float = 0.02, init_scale: float = 0.01) -> None:
        super().__init__()
        self.config = config
        self.net = EarthSpecificTransformer(config)
        c = config
        # Twice the output channels: μ then ρ for every upper-air and surface field.
        self.net.recovery = PatchRecovery(2 * c.embed_dim, 2 * c.n_upper, 2 * c.n_surface, c.patch, (c.n_levels, c.nlat))
        rho0 = float(inverse_softplus(torch.tensor(init_sigma, dtype=torch.float64)))
        with torch.no_grad():
            for conv, n in ((self.net.recovery.upper, c.n_upper), (self.net.recovery.surface, c.n_surface)):
                conv.weight.mul_(init_scale)
                conv.bias[:n] = 0.0
                conv.bias[n:] = rho0

    def forward(self, upper: Tensor, surface: Tensor, constants: Tensor | None = None) -> tuple[Fields, Fields]:
        """(N, T_in, V_u, Z, H, W), (N, T_in, V_s, H, W) → (μ, σ) as Fields of (N, V_u, Z, H, W), (N, V_s, H, W)."""
        out_upper, out_surface = self.net(upper, surface, constants)
        mu_u, rho_u = out_upper.chunk(2, dim=1)
        mu_s, rho_s = out_surface.chunk(2, dim=1)
        return Fields(mu_u, mu_s), Fields(F.softplus(rho_u), F.softplus(rho_s))

    def perturb(
        self, previous: State | None, current: State, noise: State, constants: Tensor | None = None, scale: float = 1.0
    ) -> Fields:
        """X_t' = X_t + μ + scale·σ ⊙ ε for per-time states (N, …); ``previous`` only for two-time networks."""
        times = [current] if self.config.n_input_times == 1 else [previous, current]
        if any(t is None for t in times):
            raise BdlensError("this perturbation network takes two input times: pass the state at t−Δ as `previous`")
        mu, sigma = self(torch.stack([t[0] for t in times], 1), torch.stack([t[1] for t in times], 1), constants)
        return Fields(*(x + m + scale * s * e for x, m, s, e in zip(current, mu, sigma, noise, strict=True)))


# ----------------------------------------------------------------------------------------------
# Ensembles


def tempered_weights(ensemble: PosteriorEnsemble, temperature: float) -> Tensor:
    """Weights μ + T·σ ε of the ensemble's members: its samples μ + σ ε with the deviation scaled by T."""
    if not temperature > 0:
        raise BdlensError(f"the posterior temperature must be positive, got {temperature}")
    mu = ensemble.bayes.posterior.mu.detach()
    return mu + temperature * (ensemble.weights.detach() - mu)


class PerturbedEnsemble:
    """K posterior members, each perturbing its latest input with the learned network before each step.

    Normalised units. :meth:`step` is the ``callable(previous, current)`` of
    :func:`bdlens.models.lead_time.rollout` with the shapes of :class:`~bdlens.bayes.PosteriorEnsemble`:
    shared (B, …) or per-member (K, B, …) states in, (K, B, …) out. ``sigma_scale`` multiplies σ
    (calibrated amplitude), ``temperature`` the posterior's σ at sampling time. ``network=None``
    gives the plain posterior ensemble (no perturbation). :meth:`start` keys the noise to the
    forecasts of the next rollout (see the module docstring).
    """

    def __init__(
        self,
        bayes: BayesianTransformer,
        network: PerturbationNetwork | None,
        members: int | Sequence[int],
        seed: int,
        constants: Tensor | None = None,
        sigma_scale: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        noise_seed: int | None = None,
    ) -> None:
        self.members = members_tuple(members)
        with torch.no_grad():
            self.ensemble = PosteriorEnsemble(bayes, self.members, seed, constants, chunk_size)
            if temperature != 1.0:
                self.ensemble.weights = tempered_weights(self.ensemble, temperature)
        self.bayes = bayes
        self.network = network
        self.seed = int(seed if noise_seed is None else noise_seed)  # of the perturbation noise; ``seed`` draws the weights
        self.constants = constants
        self.sigma_scale = float(sigma_scale)
        self.step_index = 0
        self.init_keys: tuple[int, ...] | None = None

    def start(self, init_keys: Sequence[int]) -> None:
        """Key the noise of the next rollout to these forecasts (one integer per forecast of the batch,
        e.g. the init time in hours since 1970) and restart the step counter."""
        self.init_keys = tuple(int(k) for k in init_keys)
        self.step_index = 0

    @property
    def size(self) -> int:
        """K, the number of members."""
        return len(self.members)

    def noise(self, init_keys: Sequence[int], like: State, step: int) -> State:
        """ε for every member and forecast at ``step``: upper (K, B, V_u, Z, H, W), surface (K, B, V_s, H, W)
        with B = len(init_keys), like ``like``'s dtype and device; member k of forecast b from its own
        generator of (seed, init_keys[b], k, step), drawn on the CPU."""
        shapes = [like[0].shape[-4:], like[1].shape[-3:]]
        upper, surface = member_noise(shapes, self.seed, self.members, NOISE_STREAM, step=step, inits=init_keys)
        return upper.to(like[0].device, like[0].dtype), surface.to(like[1].device, like[1].dtype)

    def _per_member(self, state: State) -> State:
        u, s = state
        return (u.expand(self.size, *u.shape), s.expand(self.size, *s.shape)) if u.ndim == 5 else (u, s)

    def step(self, previous: State | None, current: State) -> State:
        """(X_{t−Δ}, X_t) → X_{t+Δ} for every member, X_t perturbed first (see the class docstring)."""
        if current[0].ndim == 5:  # a rollout starts from the shared analysis: restart the noise streams
            self.step_index = 0
        if self.network is not None:
            cur = self._per_member(current)
            k, b = cur[0].shape[:2]
            prev = None if previous is None or self.network.config.n_input_times == 1 else self._per_member(previous)
            flat = lambda state: None if state is None else tuple(x.reshape(k * b, *x.shape[2:]) for x in state)  # noqa: E731
            eps = self.noise(init_keys_for(self.init_keys, b), cur, self.step_index)
            perturbed = self.network.perturb(flat(prev), flat(cur), flat(eps), self.constants, self.sigma_scale)
            current = tuple(x.reshape(k, b, *x.shape[1:]) for x in perturbed)
        self.step_index += 1
        return self.ensemble.step(previous, current)


class LearnedPerturbationStep(PosteriorStep):
    """A VI posterior with the learned perturbation as a physical-units step for K members.

    Usable wherever :class:`bdlens.forecast.PosteriorStep` is (``rollout``, ``_run``). ``sigma_scale``
    and ``temperature`` default to the ``calibration.json`` beside the perturbation checkpoint, else 1.
    ``seed`` draws the weights and, unless ``noise_seed`` is given, the perturbation noise: steps
    with one ``seed`` and several ``noise_seed`` share their weight samples θ_k (a K × J design).
    :meth:`start` keys the noise to the init times of the next rollout (see :class:`PerturbedEnsemble`).
    """

    def __init__(
        self,
        posterior: str | Path,
        perturbation: str | Path,
        members: int,
        seed: int,
        layout: FieldLayout,
        sigma_scale: float | None = None,
        temperature: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__(posterior, members, seed, layout)
        network, manifest = load_perturbation(perturbation)
        if NormStats.from_dict(manifest["norm_stats"]).key != self.stats.key:
            raise BdlensError(f"{perturbation} was trained with other normalisation statistics than the posterior {posterior}")
        calibration = read_calibration(perturbation)
        self.ensemble = PerturbedEnsemble(
            self.ensemble.bayes,
            network,
            members,
            seed,
            sigma_scale=calibration.get("amplitude", 1.0) if sigma_scale is None else sigma_scale,
            temperature=calibration.get("temperature", 1.0) if temperature is None else temperature,
            noise_seed=noise_seed,
        )

    def start(self, init_keys: Sequence[int]) -> None:
        """Key the noise of the next rollout to these forecasts (init times in hours since 1970, one per forecast)."""
        self.ensemble.start(init_keys)


# ----------------------------------------------------------------------------------------------
# Training configuration


class CurriculumSettings(BaseModel):
    """Autoregressive curriculum: rollout length 1 for ``steps_per_stage`` optimiser steps, then 2, … up to ``max_rollout``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps_per_stage: int = Field(default=250, gt=0)
    max_rollout: int = Field(default=4, ge=1)


class PerturbTrainingSettings(BaseModel):
    """Optimisation of the perturbation network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(gt=0)
    members: int = Field(default=4, ge=2, description="M, ensemble members per training sample")
    batch_size: int = Field(default=2, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    curriculum: CurriculumSettings = CurriculumSettings()
    seed: int = 0
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=50, gt=0)
    validate_every: int = Field(default=250, ge=0)


class PerturbValidationSettings(ValidationSettings):
    """K members per validation forecast, the leads (model steps), how many forecasts, their seed and
    how many run at once."""

    leads: tuple[int, ...] = (1, 4)
    max_forecasts: int = Field(default=8, gt=0)
    batch_size: int = Field(default=4, gt=0)


class PerturbConfig(YamlConfig):
    """A perturbation-training configuration (``configs/perturb_demo.yaml``)."""

    what: ClassVar[str] = "perturbation config"

    network: NetworkSettings = NetworkSettings()
    training: PerturbTrainingSettings
    validation: PerturbValidationSettings = PerturbValidationSettings()


def curriculum_rollout(step: int, settings: CurriculumSettings) -> int:
    """Rollout length (model steps) for optimiser step ``step`` (0-based)."""
    return min(settings.max_rollout, 1 + step // settings.steps_per_stage)


def step_seed(seed: int, step: int) -> int:
    """The seed of optimiser step ``step``'s weight samples and noise (a 31-bit value from (seed, step))."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------------
# Training


def rollout_loss(
    ensemble: PerturbedEnsemble, loss_fn: EnsembleCRPSLoss, previous: State | None, current: State, targets: Sequence[State]
) -> Tensor:
    """Mean over leads 1..n of the weighted fair CRPS of the members' n-step rollout against ``targets``."""
    total = 0.0
    for target in targets:
        previous, current = current, ensemble.step(previous, current)
        total = total + loss_fn(current, target)
    return total / len(targets)


def train_perturbation(
    bayes: BayesianTransformer,
    train_set: Dataset,
    config: PerturbConfig,
    out_dir: str | Path,
    val_set: Dataset | None = None,
    constants: Tensor | None = None,
    norm_stats: dict[str, Any] | None = None,
    resume: bool = False,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Train the perturbation network for the frozen posterior ``bayes`` into ``out_dir``; returns the checkpoint dir.

    ``train_set``/``val_set``: :class:`bdlens.data.WeatherDataset` s (normalised, with ``times`` and
    ``step``). Writes ``metrics.jsonl``, ``state.pt`` every ``checkpoint_every`` steps (exact resume
    with ``resume``) and ``checkpoint/`` at the end (manifest: ``norm_stats``, ``manifest_extra``).

    Under ``torchrun`` the ranks split each batch and average their gradients. Every rank uses the
    same weight samples at a step and keys each sample's noise by its training-sample index, so the
    ranks together compute the same loss and update as one process with the whole batch.
    """
    settings = config.training
    dist_info = Distributed.from_env()
    dist_info.check_batch(settings.batch_size)
    out_dir = Path(out_dir)
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    bayes.requires_grad_(False).eval()
    net_config = config.network.model_config_for(bayes.config)
    torch.manual_seed(settings.seed)
    network = PerturbationNetwork(net_config, config.network.init_sigma, config.network.init_scale).to(bayes.posterior.mu.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = min(settings.warmup_steps, settings.steps - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, settings.steps))
    samples = lead_targets(train_set, tuple(range(1, settings.curriculum.max_rollout + 1)), len(train_set))
    if len(samples) < settings.batch_size:
        raise BdlensError(
            f"only {len(samples)} training samples reach {settings.curriculum.max_rollout} steps ahead, fewer than batch_size "
            f"{settings.batch_size}; lower batch_size or max_rollout"
        )
    loss_fn = EnsembleCRPSLoss(latitudes(bayes, train_set), bayes.config.upper_variables, bayes.config.surface_variables)
    loss_fn = loss_fn.to(bayes.posterior.mu.device)

    step, elapsed = 0, 0.0
    if resume:
        state = read_state(out_dir, config, "perturbation")
        step, elapsed = restore(state, dist_info, network=network, optimizer=optimizer, scheduler=scheduler)
        log.info("resumed %s at step %d", out_dir, step)
    if dist_info.main:
        truncate_metrics(out_dir, step)

    network.train()
    quiet_rank = {} if dist_info.main else {"disable": True}
    with bar(total=settings.steps, initial=step, desc="perturbation training", unit="step", **quiet_rank) as progress:
        while step < settings.steps:
            tick = time.perf_counter()
            rollout = curriculum_rollout(step, settings.curriculum)
            chosen = [samples[i] for i in batch_indices(step, len(samples), settings.batch_size, settings.seed, dist_info)]
            previous, current = collate_states(train_set, [i for i, _ in chosen])
            targets = [collate_targets(train_set, [later[lead] for _, later in chosen]) for lead in range(rollout)]
            ensemble = PerturbedEnsemble(bayes, network, settings.members, step_seed(settings.seed, step), constants)
            ensemble.start([i for i, _ in chosen])
            loss = rollout_loss(ensemble, loss_fn, previous, current, targets)
            grad_norm = optimizer_step(loss, list(network.parameters()), optimizer, scheduler, settings.grad_clip, dist_info)
            step += 1
            elapsed += time.perf_counter() - tick
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", rollout=rollout)
            if step % settings.log_every == 0 or step == settings.steps:
                global_loss = average_scalar(loss.item(), dist_info)  # the loss of the whole batch
                if dist_info.main:
                    log_metrics(out_dir, {"step": step, "loss": global_loss, "rollout": rollout, "grad_norm": grad_norm,
                                          "lr": scheduler.get_last_lr()[0], "train_seconds": round(elapsed, 1)})
            validating = val_set is not None and settings.validate_every and (step % settings.validate_every == 0 or step == settings.steps)
            if validating and dist_info.main:
                for row in validate_perturbation(bayes, network, val_set, config.validation, constants):
                    log_metrics(out_dir, {"step": step, "split": "val", **row})
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save_state(out_dir, {"network": network.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "step": step, "elapsed": elapsed}, config, dist_info)
    log_rank_agreement(out_dir, network.parameters(), dist_info)
    if not dist_info.main:
        return out_dir / CHECKPOINT
    return save_perturbation(network, config, out_dir / CHECKPOINT, norm_stats, {
        **(manifest_extra or {}), "step": step, "train_seconds": round(elapsed, 1), "validation": last_validation(out_dir),
    })


def validate_perturbation(
    bayes: BayesianTransformer, network: PerturbationNetwork, dataset: Dataset, settings: PerturbValidationSettings,
    constants: Tensor | None = None,
) -> list[dict[str, float]]:
    """Per-lead :func:`ensemble_scores` (fair CRPS, RMSE, spread, corrected spread-skill) of the perturbed
    posterior ensemble: K members of ``settings.seed``, forecast i's noise keyed by its sample index."""
    was_training = network.training
    network.eval()

    ensemble = PerturbedEnsemble(bayes, network, settings.members, settings.seed, constants)
    rows = ensemble_scores(ensemble, dataset, settings.leads, settings.max_forecasts, settings.batch_size, latitudes(bayes, dataset))
    network.train(was_training)
    return [{k: v for k, v in row.items() if k not in ("mse", "variance")} for row in rows]


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_perturbation(
    network: PerturbationNetwork, config: PerturbConfig, directory: str | Path, norm_stats: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the network (safetensors) and its manifest (``kind: "perturbation"``) to ``directory``."""
    manifest = {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "model_config": network.config.model_dump(mode="json"),
        "network": config.network.model_dump(mode="json"),
        "perturb_config": config.model_dump(mode="json"),
        "norm_stats": norm_stats,
        **(extra or {}),
    }
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    return save_checkpoint(directory, network.state_dict(), manifest)


def load_perturbation(directory: str | Path, device: torch.device | str = "cpu") -> tuple[PerturbationNetwork, dict[str, Any]]:
    """The network of a ``bdlens train perturb`` checkpoint (eval mode, on ``device``) and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise BdlensError(
            f"{directory} holds a {manifest.get('kind')!r} checkpoint, not a perturbation network; train one with `bdlens train perturb`"
        )
    if manifest.get("norm_stats") is None:
        raise BdlensError(f"{directory}/manifest.json has no norm_stats; retrain it with `bdlens train perturb`")
    config = ModelConfig.from_dict(manifest["model_config"], source=f"{directory}/manifest.json")
    network = PerturbationNetwork(config)
    load_state_into(network, load_weights(directory), directory)
    return network.to(device).eval(), manifest


def read_calibration(directory: str | Path) -> dict[str, Any]:
    """The ``calibration.json`` beside a checkpoint's manifest ({} when there is none)."""
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BdlensError(f"{path} is corrupted ({err.msg}); rerun `bdlens calibrate`") from err
