"""Variational post-training of a Bayesian 3DEST with pyro's SVI (docs/science.md §4).

The loop is pyro's ``SVI`` with ``TraceMeanField_ELBO`` (closed-form KL) and ``pyro.optim.Adam``
(separate learning rates for μ and ρ). benchmarks/bench_bayes.py measures pyro's per-step overhead
on the demo model (configs/model_demo.yaml, 1.2 M weights, batch 4) against a hand-written step with
the same objective and torch.optim.Adam, interleaved, best of 5–10, on a shared 2-core machine:
with pyro's argument validation off, SVI cost +3.5 % (0.530 vs 0.512 s, 2 threads), +9.5 %
(0.183 vs 0.165 s, 1 thread) and +13.2 % (0.423 vs 0.367 s, 2 threads) of a step — under the 20 %
that would justify a hand-written loop; with validation on, +48 %, +13 % and +36 % (it re-checks
the 1.2 M-entry distribution parameters and samples at every step). Rerun with the trainer's own
optimiser (:class:`GradientAveragingOptim`, a no-op on one process): +5.0 % (0.167 vs 0.159 s, 1 thread). So the step runs under
``pyro.validation_enabled(False)``; σ = softplus(ρ) > 0 and a real-valued θ hold by construction.

On the one training loop (:func:`bdlens.training.loop.run`), as the other trainers: batches in a
seeded order per epoch; inputs taken from the analysis (truth + analysis error) instead of the truth
with ``analysis_input_probability`` per input time, so that a learned μ keeps the pretrained model's
robustness to imperfect initial states; a metrics log (JSONL) of the loss, its KL part and the mean
σ; periodic validation that reports, per lead, the RMSE of the mean over K posterior members and
their spread, over all channels (normalised) and per variable and level in physical units;
``state.pt`` (posterior, optimiser, every rank's RNG, step), from which training resumes exactly (4
steps in one go equal 2 steps, stop, resume, 2 steps, bit for bit); ``checkpoint/`` at the end, with
the last validation in its manifest.

Data parallel under ``torchrun`` (:mod:`bdlens.training.distributed`): each rank takes its slice of
the global batch and draws its own weight sample, and :class:`GradientAveragingOptim` averages the
gradients of μ and ρ over the ranks before pyro's optimiser steps (as pyro's ``HorovodOptimizer``
does for Horovod), so every rank applies the same update and the posteriors stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pyro
import pyro.optim
import torch
from pydantic import ConfigDict, Field
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import PyroOptim
from torch import Tensor
from torch.utils.data import Dataset

from bdlens.bayes.objective import kl_scale, model_and_guide
from bdlens.bayes.posterior import BayesianTransformer, PosteriorSettings, save_posterior
from bdlens.bayes.sampling import PosteriorEnsemble
from bdlens.configs import YamlConfig
from bdlens.devices import autocast, to_device
from bdlens.errors import BdlensError
from bdlens.models import WeightedL1Loss
from bdlens.training.batches import BatchLoader, latitudes, seeded_batch
from bdlens.training.config import ExecutionSettings, execution_fields
from bdlens.training.distributed import Distributed, average_gradients
from bdlens.training.ensemble_validation import ValidationSettings, channel_std, ensemble_scores, reported
from bdlens.training.loop import Cadence, Objective, run
from bdlens.training.run import last_validation

__all__ = ["GradientAveragingOptim", "TrainingSettings", "VIConfig", "ValidationSettings", "latitudes", "train_vi", "validate"]


class TrainingSettings(ExecutionSettings):
    """The SVI loop: steps, global batch, learning rates of μ and ρ, tempering β, N_D, analysis inputs,
    cadence, and where it computes (:class:`~bdlens.training.config.ExecutionSettings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(gt=0)
    batch_size: int = Field(default=2, gt=0, description="global batch (split across DDP ranks)")
    lr_mu: float = Field(default=1e-5, ge=0)
    lr_rho: float = Field(default=1e-2, ge=0)
    beta: float = Field(default=1e-4, ge=0)
    n_data: int | None = Field(default=None, gt=0)
    particles: int = Field(default=1, gt=0)
    clip_norm: float | None = Field(default=None, gt=0)
    analysis_input_probability: float = Field(
        default=0.0, ge=0, le=1,
        description="chance that each input time comes from the analysis (truth + analysis error) instead of the truth",
    )
    seed: int = 0
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    validate_every: int = Field(default=100, ge=0)


class VIConfig(YamlConfig):
    """A VI post-training configuration (configs/vi_demo.yaml); the data are those of the pretrained model."""

    what: ClassVar[str] = "VI config"

    posterior: PosteriorSettings = PosteriorSettings()
    training: TrainingSettings
    validation: ValidationSettings = ValidationSettings()


class GradientAveragingOptim(PyroOptim):
    """A :class:`pyro.optim.PyroOptim` that first averages every parameter's gradient over the DDP ranks.

    Parameters are taken in the order of their param-store names, the same on every rank, because
    SVI hands them over as a set. On one process it is the wrapped optimiser unchanged.
    """

    def __init__(self, optim: PyroOptim, dist_info: Distributed) -> None:
        super().__init__(optim.pt_optim_constructor, optim.pt_optim_args, optim.pt_clip_args)
        self.dist_info = dist_info

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = sorted(params, key=pyro.get_param_store().param_name)
        average_gradients(params, self.dist_info)
        super().__call__(params, *args, **kwargs)


def svi_optimiser(settings: TrainingSettings, dist_info: Distributed) -> PyroOptim:
    """pyro's Adam with the learning rates of μ and ρ (and clipping) of ``settings``, averaging gradients over ranks."""

    def args(name: str) -> dict[str, float]:
        return {"lr": settings.lr_rho if name.endswith("rho") else settings.lr_mu}

    clip = {"clip_norm": settings.clip_norm} if settings.clip_norm is not None else {}
    return GradientAveragingOptim(pyro.optim.Adam(args, clip), dist_info)


@torch.no_grad()
def validate(
    bayes: BayesianTransformer, dataset: Dataset, settings: ValidationSettings, constants: Tensor | None = None
) -> list[dict[str, Any]]:
    """Per lead (model steps): the latitude-weighted RMSE of the K-member posterior mean and the member
    spread (√ of the mean unbiased member variance) over all channels in normalised units (``rmse``,
    ``spread``), with the fair CRPS and the spread-skill ratio; per variable and level in physical
    units (``rmse_<var>_<level>``, ``spread_<var>_<level>``) when the dataset has a layout and stats.
    The same K weight samples (``settings.seed``) serve every forecast."""
    per_variable = channel_std(dataset) is not None
    return reported(ensemble_scores(
        PosteriorEnsemble(bayes, settings.members, settings.seed, constants), dataset, settings.leads,
        settings.max_forecasts, settings.batch_size, latitudes(bayes, dataset), per_variable=per_variable, device=bayes.posterior.mu.device,
    ))


class _PyroOptimState:
    """A pyro optimiser seen as a ``state_dict`` / ``load_state_dict`` object by the training loop
    (pyro keeps one torch optimiser per parameter and applies a loaded state when it creates them)."""

    def __init__(self, optim: PyroOptim) -> None:
        self.optim = optim

    def state_dict(self) -> dict[str, Any]:
        return self.optim.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optim.set_state(state)


class VIObjective(Objective):
    """The tempered negative ELBO of :func:`bdlens.bayes.objective.model_and_guide`, stepped by pyro's SVI."""

    description = "VI training"
    what = "VI"
    may_change = ("training.steps", *execution_fields("training."))  # no schedule: a finished run can be extended

    def __init__(
        self, bayes: BayesianTransformer, train_set: Dataset, config: VIConfig, dist_info: Distributed, val_set: Dataset | None,
        constants: Tensor | None, norm_stats: dict[str, Any] | None, manifest_extra: dict[str, Any] | None, analysis_set: Dataset | None,
    ) -> None:
        settings = config.training
        self.config, self.settings, self.dist_info = config, settings, dist_info
        self.device = dist_info.device
        self.bayes, self.train_set, self.val_set, self.analysis_set = bayes.to(self.device), train_set, val_set, analysis_set
        self.constants = to_device(constants, self.device)
        self.norm_stats, self.manifest_extra = norm_stats, manifest_extra
        self.cadence = Cadence(settings.steps, settings.log_every, settings.validate_every, settings.checkpoint_every)
        if len(train_set) < settings.batch_size:
            raise BdlensError(f"batch_size {settings.batch_size} exceeds the {len(train_set)} training samples; lower batch_size")
        if settings.analysis_input_probability > 0 and analysis_set is None:
            raise BdlensError("analysis_input_probability > 0 needs the analysis of the training data (analysis_set / --analysis)")
        self.n_data = settings.n_data or len(train_set)
        pyro.clear_param_store()
        self.optimiser = svi_optimiser(settings, dist_info)
        loss_fn = WeightedL1Loss(latitudes(bayes, train_set), bayes.config.upper_variables, bayes.config.surface_variables).to(self.device)
        model, guide = model_and_guide(bayes, loss_fn, settings.beta, self.n_data, self.constants,
                                       forward_context=partial(autocast, self.device, settings.precision))
        self.svi = SVI(model, guide, self.optimiser, TraceMeanField_ELBO(num_particles=settings.particles))
        make = partial(seeded_batch, dataset=train_set, batch_size=settings.batch_size, seed=settings.seed, dist_info=dist_info,
                       analysis=analysis_set, probability=settings.analysis_input_probability, input_times=bayes.config.n_input_times)
        self.batches = BatchLoader(make, settings.steps, settings.loader_workers, self.device)

    def stateful(self) -> dict[str, Any]:
        return {"bayes": self.bayes, "optimiser": _PyroOptimState(self.optimiser)}

    def fresh_start(self, dist_info: Distributed) -> None:
        torch.manual_seed(self.settings.seed + 1_000_003 * dist_info.rank)  # each rank draws its own weight samples

    def train_step(self, step: int) -> dict[str, float]:
        batch = self.batches(step)
        with pyro.validation_enabled(False):
            return {"loss": self.svi.step(batch)}

    @torch.no_grad()
    def log_fields(self) -> dict[str, float]:
        kl = float(self.bayes.posterior.kl())
        return {"kl_term": kl_scale(self.settings.beta, self.n_data) * kl, "kl": kl, "sigma_mean": float(self.bayes.posterior.sigma.mean())}

    def validate(self) -> list[dict[str, Any]]:
        if self.val_set is None:
            return []
        return [{"split": "val", **row} for row in validate(self.bayes, self.val_set, self.config.validation, self.constants)]

    def parameters(self) -> Iterable[Tensor]:
        return self.bayes.posterior.parameters()

    def save(self, directory: Path, summary: dict[str, Any]) -> Path:
        extra = {**(self.manifest_extra or {}), "vi_config": self.config.model_dump(mode="json"), **summary,
                 "validation": last_validation(directory.parent)}
        save_posterior(self.bayes, directory, self.norm_stats, extra)
        return directory


def train_vi(
    bayes: BayesianTransformer,
    train_set: Dataset,
    config: VIConfig,
    out_dir: str | Path,
    val_set: Dataset | None = None,
    constants: Tensor | None = None,
    norm_stats: dict[str, Any] | None = None,
    resume: bool = False,
    manifest_extra: dict[str, Any] | None = None,
    analysis_set: Dataset | None = None,
    depends: dict[str, Any] | None = None,
) -> BayesianTransformer:
    """Post-train ``bayes`` on ``train_set`` (samples ``((X_{t−Δ}, X_t), X_{t+Δ})``) up to ``config.training.steps``.

    ``analysis_set``: the same samples from the analysis, needed when ``analysis_input_probability`` > 0.
    Writes ``<out_dir>/metrics.jsonl``, ``<out_dir>/state.pt`` every ``checkpoint_every`` steps and
    ``<out_dir>/checkpoint`` at the end (its manifest gets ``norm_stats``, the VI config, the step, the
    last validation and ``manifest_extra``). With ``resume`` everything (posterior, optimiser, RNG,
    step) comes from ``state.pt``, which must have been written with the same config but for
    ``training.steps`` (raise it to train a finished run for longer) and the same ``depends`` (e.g. the
    ``--from`` checkpoint's hash). Under
    ``torchrun`` the ranks split each batch (see the module docstring). Returns the trained model.
    """
    dist_info = Distributed.from_env(config.training.device)
    dist_info.check_batch(config.training.batch_size)
    objective = VIObjective(bayes, train_set, config, dist_info, val_set, constants, norm_stats, manifest_extra, analysis_set)
    objective.depends = depends
    run(objective, out_dir, dist_info, resume)
    return bayes
