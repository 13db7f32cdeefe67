"""Training the learned perturbation network with fair CRPS (docs/science.md §5; the network: :mod:`bdlens.perturbation.learned`).

The backbone and the posterior are frozen; each training sample rolls out M members (weights
``sample_weights(bayes, M, seed_t)`` with a fresh seed per optimiser step, held fixed over the
rollout) for n steps, and the loss is the fair CRPS (:func:`fair_crps`) of the M members against the
truth at every lead 1..n, latitude- and variable-weighted like the backbone's L1 loss (docs/science.md §3: with
one member the fair-CRPS kernel becomes |x − y|), averaged over the leads. Gradients flow through the
frozen backbone into the perturbation network only. The rollout length n follows an autoregressive
curriculum (:func:`curriculum_rollout`): 1 step for the first ``steps_per_stage`` optimiser steps,
then 2, …, up to ``max_rollout`` (4). AdamW with warm-up and cosine decay, a seeded batch order per
epoch, on the one training loop (:func:`bdlens.training.loop.run`: ``state.pt`` for exact resume,
``metrics.jsonl``, progress, DDP) with periodic validation of the fair CRPS and the corrected
spread-skill ratio per lead (:func:`ensemble_scores`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import Dataset

from bdlens import streams
from bdlens.bayes.posterior import BayesianTransformer
from bdlens.bayes.sampling import PosteriorEnsemble
from bdlens.configs import YamlConfig
from bdlens.devices import autocast, to_device
from bdlens.errors import BdlensError
from bdlens.models import WeightedL1Loss
from bdlens.perturbation.initial import member_noise
from bdlens.perturbation.learned import NOISE_STREAM, NetworkSettings, PerturbationNetwork, State, save_perturbation
from bdlens.perturbation.patterns import init_keys_for, members_tuple
from bdlens.training.batches import BatchLoader, collate_states, collate_targets, latitudes, lead_targets
from bdlens.training.config import ExecutionSettings, execution_fields
from bdlens.training.distributed import Distributed, batch_indices, optimizer_step
from bdlens.training.ensemble_validation import ValidationSettings, ensemble_scores, fair_crps, reported
from bdlens.training.loop import Cadence, Objective, run
from bdlens.training.run import last_validation
from bdlens.training.schedule import lr_factor


def tempered_weights(ensemble: PosteriorEnsemble, temperature: float) -> Tensor:
    """Weights m_k + T·σ ε_k of the ensemble's members: its samples m_k + σ ε_k with the deviation from
    their component's location m_k (μ for a single Gaussian) scaled by T."""
    if not temperature > 0:
        raise BdlensError(f"the posterior temperature must be positive, got {temperature}")
    locs = ensemble.bayes.posterior.locations(ensemble.indices)
    return locs + temperature * (ensemble.weights.detach() - locs)


class PerturbedEnsemble:
    """K posterior members, each perturbing its latest input with the learned network before each step:
    the differentiable training-time ensemble (forecasts use :mod:`bdlens.ensemble.schemes.learned`).

    Member k has posterior weight sample θ_k (fixed for the rollout) and its own noise: ε for member k
    of the forecast with *init key* i at step s comes from the stream (seed, "learned-perturbation",
    k, s, i) of :mod:`bdlens.streams` alone, so a member does not depend on which other members or
    forecasts share its batch. The init keys of a batch are set by :meth:`start`; without it they are
    the positions 0..B−1 in the batch (training and validation). The step counter restarts at
    ``start`` and whenever a rollout starts from a state shared by all members (the analysis).

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
    ) -> None:
        self.members = members_tuple(members)
        with torch.no_grad():
            self.ensemble = PosteriorEnsemble(bayes, self.members, seed, constants, chunk_size)
            if temperature != 1.0:
                self.ensemble.weights = tempered_weights(self.ensemble, temperature)
        self.bayes = bayes
        self.network = network
        self.seed = int(seed)
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


class CurriculumSettings(BaseModel):
    """Autoregressive curriculum: rollout length 1 for ``steps_per_stage`` optimiser steps, then 2, … up to ``max_rollout``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps_per_stage: int = Field(default=250, gt=0)
    max_rollout: int = Field(default=4, ge=1)


class PerturbTrainingSettings(ExecutionSettings):
    """Optimisation of the perturbation network, and where it computes (:class:`~bdlens.training.config.ExecutionSettings`)."""

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
    """The seed of optimiser step ``step``'s weight samples and noise: a 31-bit draw of the stream
    (seed, "perturbation-training", step) of :mod:`bdlens.streams`."""
    return int(torch.randint(2**31 - 1, (), generator=streams.generator(seed, "perturbation-training", step=step)))


def rollout_batch(
    step: int, samples: Sequence[tuple[int, list[int]]], dataset: Dataset, settings: PerturbTrainingSettings, dist_info: Distributed
) -> tuple[list[int], State | None, State, list[State]]:
    """This rank's batch at ``step``: the seeded choice of (sample, later samples) of ``samples``
    (:func:`lead_targets`), as (sample indices, X_{t−Δ} or None, X_t, the targets of the
    :func:`curriculum_rollout` leads)."""
    chosen = [samples[i] for i in batch_indices(step, len(samples), settings.batch_size, settings.seed, dist_info)]
    previous, current = collate_states(dataset, [i for i, _ in chosen])
    rollout = curriculum_rollout(step, settings.curriculum)
    targets = [collate_targets(dataset, [later[lead] for _, later in chosen]) for lead in range(rollout)]
    return [i for i, _ in chosen], previous, current, targets


def rollout_loss(
    ensemble: PerturbedEnsemble, loss_fn: EnsembleCRPSLoss, previous: State | None, current: State, targets: Sequence[State]
) -> Tensor:
    """Mean over leads 1..n of the weighted fair CRPS of the members' n-step rollout against ``targets``."""
    total = 0.0
    for target in targets:
        previous, current = current, ensemble.step(previous, current)
        total = total + loss_fn(current, target)
    return total / len(targets)


class PerturbationObjective(Objective):
    """The fair CRPS of M members rolled out by the frozen posterior with the learned perturbation."""

    description = "perturbation training"
    what = "perturbation"
    may_change = execution_fields("training.")

    def __init__(
        self, bayes: BayesianTransformer, train_set: Dataset, config: PerturbConfig, dist_info: Distributed, val_set: Dataset | None,
        constants: Tensor | None, norm_stats: dict[str, Any] | None, manifest_extra: dict[str, Any] | None,
    ) -> None:
        settings = config.training
        self.config, self.settings, self.dist_info = config, settings, dist_info
        device = self.device = dist_info.device
        self.bayes, self.train_set, self.val_set, self.constants = bayes.to(device), train_set, val_set, to_device(constants, device)
        self.norm_stats, self.manifest_extra = norm_stats, manifest_extra
        self.cadence = Cadence(settings.steps, settings.log_every, settings.validate_every, settings.checkpoint_every)
        bayes.requires_grad_(False).eval()
        torch.manual_seed(settings.seed)
        self.network = PerturbationNetwork(config.network.model_config_for(bayes.config), config.network.init_sigma, config.network.init_scale)
        self.network.to(device).train()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        warmup = min(settings.warmup_steps, settings.steps - 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, settings.steps))
        self.samples = lead_targets(train_set, tuple(range(1, settings.curriculum.max_rollout + 1)), len(train_set))
        if len(self.samples) < settings.batch_size:
            raise BdlensError(
                f"only {len(self.samples)} training samples reach {settings.curriculum.max_rollout} steps ahead, fewer than batch_size "
                f"{settings.batch_size}; lower batch_size or max_rollout"
            )
        loss_fn = EnsembleCRPSLoss(latitudes(bayes, train_set), bayes.config.upper_variables, bayes.config.surface_variables)
        self.loss_fn = loss_fn.to(device)
        make = partial(rollout_batch, samples=self.samples, dataset=train_set, settings=settings, dist_info=dist_info)
        self.batches = BatchLoader(make, settings.steps, settings.loader_workers, device)

    def stateful(self) -> dict[str, Any]:
        return {"network": self.network, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def train_step(self, step: int) -> dict[str, float]:
        settings = self.settings
        keys, previous, current, targets = self.batches(step)
        ensemble = PerturbedEnsemble(self.bayes, self.network, settings.members, step_seed(settings.seed, step), self.constants)
        ensemble.start(keys)
        with autocast(self.device, settings.precision):
            loss = rollout_loss(ensemble, self.loss_fn, previous, current, targets)
        parameters = list(self.network.parameters())
        grad_norm = optimizer_step(loss, parameters, self.optimizer, self.scheduler, settings.grad_clip, self.dist_info)
        return {"loss": loss.item(), "rollout": len(targets), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> list[dict[str, Any]]:
        if self.val_set is None:
            return []
        rows = validate_perturbation(self.bayes, self.network, self.val_set, self.config.validation, self.constants)
        return [{"split": "val", **row} for row in rows]

    def parameters(self) -> Iterable[Tensor]:
        return self.network.parameters()

    def save(self, directory: Path, summary: dict[str, Any]) -> Path:
        extra = {**(self.manifest_extra or {}), "perturb_config": self.config.model_dump(mode="json"), **summary,
                 "validation": last_validation(directory.parent)}
        return save_perturbation(self.network, self.config.network, directory, self.norm_stats, extra)


def train_perturbation(
    bayes: BayesianTransformer,
    train_set: Dataset,
    config: PerturbConfig,
    out_dir: str | Path,
    val_set: Dataset | None = None,
    constants: Tensor | None = None,
    norm_stats: dict[str, Any] | None = None,
    resume: bool = False,
    depends: dict[str, Any] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Train the perturbation network for the frozen posterior ``bayes`` into ``out_dir``; returns the checkpoint dir.

    ``train_set``/``val_set``: :class:`bdlens.data.WeatherDataset` s (normalised, with ``times`` and
    ``step``). Writes ``metrics.jsonl``, ``state.pt`` every ``checkpoint_every`` steps (exact resume
    with ``resume``, which also checks ``depends``, e.g. the posterior checkpoint's hash) and ``checkpoint/`` at the end (manifest: ``norm_stats``, ``manifest_extra``).

    Under ``torchrun`` the ranks split each batch and average their gradients. Every rank uses the
    same weight samples at a step and keys each sample's noise by its training-sample index, so the
    ranks together compute the same loss and update as one process with the whole batch.
    """
    dist_info = Distributed.from_env(config.training.device)
    dist_info.check_batch(config.training.batch_size)
    objective = PerturbationObjective(bayes, train_set, config, dist_info, val_set, constants, norm_stats, manifest_extra)
    objective.depends = depends
    return run(objective, out_dir, dist_info, resume)


def validate_perturbation(
    bayes: BayesianTransformer, network: PerturbationNetwork, dataset: Dataset, settings: PerturbValidationSettings,
    constants: Tensor | None = None,
) -> list[dict[str, float]]:
    """Per-lead :func:`ensemble_scores` (fair CRPS, RMSE, spread, corrected spread-skill) of the perturbed
    posterior ensemble: K members of ``settings.seed``, forecast i's noise keyed by its sample index."""
    was_training = network.training
    network.eval()

    ensemble = PerturbedEnsemble(bayes, network, settings.members, settings.seed, constants)
    rows = ensemble_scores(ensemble, dataset, settings.leads, settings.max_forecasts, settings.batch_size, latitudes(bayes, dataset),
                           device=bayes.posterior.mu.device)
    network.train(was_training)
    return reported(rows)


