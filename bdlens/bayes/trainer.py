"""Variational post-training of a Bayesian 3DEST with pyro's SVI (SPEC §4).

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

Conveniences, as in the deterministic trainer: batches in a seeded order per epoch; inputs taken from
the analysis (truth + analysis error) instead of the truth with ``analysis_input_probability`` per
input time, so that a learned μ keeps the pretrained model's robustness to imperfect initial states;
a metrics log (JSONL) of the loss, its KL part and the mean σ; periodic validation that reports, per
lead, the RMSE of the mean over K posterior members and their spread, over all channels (normalised)
and per variable and level in physical units; ``state.pt`` (posterior, optimiser, every rank's RNG,
step), from which training resumes exactly (4 steps in one go equal 2 steps, stop, resume, 2 steps,
bit for bit); ``checkpoint/`` at the end, with the last validation in its manifest.

Data parallel under ``torchrun`` (:mod:`bdlens.training.distributed`): each rank takes its slice of
the global batch and draws its own weight sample, and :class:`GradientAveragingOptim` averages the
gradients of μ and ρ over the ranks before pyro's optimiser steps (as pyro's ``HorovodOptimizer``
does for Horovod), so every rank applies the same update and the posteriors stay identical.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.optim
import torch
from pydantic import BaseModel, ConfigDict, Field
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import PyroOptim
from torch import Tensor
from torch.utils.data import Dataset

from bdlens.bayes.objective import kl_scale, model_and_guide
from bdlens.bayes.posterior import BayesianTransformer, PosteriorSettings, save_posterior
from bdlens.bayes.sampling import PosteriorEnsemble
from bdlens.configs import YamlConfig
from bdlens.data import Fields
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.models import WeightedL1Loss
from bdlens.progress import bar
from bdlens.training.batches import analysis_choice, collate
from bdlens.training.distributed import Distributed, average_gradients, average_scalar, batch_indices
from bdlens.training.ensemble_validation import channel_std, ensemble_scores
from bdlens.training.run import (
    CHECKPOINT,
    create_run_dir,
    last_validation,
    log_metrics,
    log_rank_agreement,
    read_state,
    restore,
    save_state,
    truncate_metrics,
)

log = logging.getLogger(__name__)


class TrainingSettings(BaseModel):
    """The SVI loop: steps, global batch, learning rates of μ and ρ, tempering β, N_D, analysis inputs, cadence."""

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


class ValidationSettings(BaseModel):
    """K posterior members per validation forecast, the leads (in model steps), how many forecasts,
    their seed and how many forecasts run at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: int = Field(default=8, gt=1)
    leads: tuple[int, ...] = (1,)
    max_forecasts: int = Field(default=16, gt=0)
    seed: int = 12345
    batch_size: int = Field(default=4, gt=0)


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


def latitudes(bayes: BayesianTransformer, dataset: Dataset | None = None) -> np.ndarray:
    """Grid latitudes (degrees, ascending): the dataset's grid, else the config's, else equiangular without poles."""
    grid = getattr(getattr(dataset, "layout", None), "grid", None)
    if grid is not None:
        return grid.latitudes()
    config = bayes.config
    if config.grid is not None:
        return GRIDS[config.grid].latitudes()
    return -90.0 + 180.0 / config.nlat * (np.arange(config.nlat) + 0.5)


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
    rows = ensemble_scores(
        PosteriorEnsemble(bayes, settings.members, settings.seed, constants), dataset, settings.leads,
        settings.max_forecasts, settings.batch_size, latitudes(bayes, dataset), per_variable=per_variable,
    )
    return [{k: v for k, v in row.items() if k not in ("mse", "variance")} for row in rows]


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
    hash of the deterministic checkpoint it started from; see :func:`bdlens.training.run.read_state`). Under
    ``torchrun`` the ranks split each batch (see the module docstring). Returns the trained model.
    """
    settings = config.training
    dist_info = Distributed.from_env()
    dist_info.check_batch(settings.batch_size)
    n_train = len(train_set)
    if n_train < settings.batch_size:
        raise BdlensError(f"batch_size {settings.batch_size} exceeds the {n_train} training samples; lower batch_size")
    if settings.analysis_input_probability > 0 and analysis_set is None:
        raise BdlensError("analysis_input_probability > 0 needs the analysis of the training data (analysis_set / --analysis)")
    n_data = settings.n_data or n_train
    out_dir = Path(out_dir)
    create_run_dir(out_dir, "vi", dist_info)

    pyro.clear_param_store()
    optimiser = svi_optimiser(settings, dist_info)
    step, elapsed = 0, 0.0
    if resume:
        state = read_state(out_dir, config, "VI", may_change=("training.steps",), depends=depends)  # no schedule: a run can be extended
        step, elapsed = restore(state, dist_info, bayes=bayes)
        optimiser.set_state(state["optimiser"])  # pyro's optimiser keeps one torch optimiser per parameter
        log.info("resuming VI training from %s at step %d", out_dir, step)
    else:
        torch.manual_seed(settings.seed + 1_000_003 * dist_info.rank)  # each rank draws its own weight samples
    if dist_info.main:
        truncate_metrics(out_dir, step)

    device = bayes.posterior.mu.device
    loss_fn = WeightedL1Loss(latitudes(bayes, train_set), bayes.config.upper_variables, bayes.config.surface_variables).to(device)
    model, guide = model_and_guide(bayes, loss_fn, settings.beta, n_data, constants)
    svi = SVI(model, guide, optimiser, TraceMeanField_ELBO(num_particles=settings.particles))
    post = bayes.posterior
    n_times = bayes.config.n_input_times

    quiet_rank = {} if dist_info.main else {"disable": True}
    with bar(total=settings.steps, initial=step, desc="VI training", unit="step", **quiet_rank) as progress:
        while step < settings.steps:
            tick = time.perf_counter()
            indices = batch_indices(step, n_train, settings.batch_size, settings.seed, dist_info)
            analysis_inputs = None
            if settings.analysis_input_probability > 0:
                choice = analysis_choice(settings.seed, step, dist_info.rank, len(indices), n_times, settings.analysis_input_probability)
                analysis_inputs = (analysis_set, choice)
            batch = tuple(Fields(*(x.to(device) for x in fields)) for fields in collate(train_set, indices, analysis_inputs))
            with pyro.validation_enabled(False):
                loss = svi.step(batch)
            step += 1
            elapsed += time.perf_counter() - tick
            progress.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                loss = average_scalar(loss, dist_info)  # the loss of the global batch
                with torch.no_grad():
                    kl, sigma_mean = float(post.kl()), float(post.sigma.mean())
                if dist_info.main:
                    log_metrics(out_dir, {"step": step, "loss": loss, "kl_term": kl_scale(settings.beta, n_data) * kl, "kl": kl,
                                          "sigma_mean": sigma_mean, "train_seconds": round(elapsed, 1)})
                progress.set_postfix(loss=f"{loss:.4f}")
            validating = val_set is not None and settings.validate_every and (step % settings.validate_every == 0 or step == settings.steps)
            if validating and dist_info.main:
                for row in validate(bayes, val_set, config.validation, constants):
                    log_metrics(out_dir, {"step": step, "split": "val", **row})
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save_state(out_dir, {"bayes": bayes.state_dict(), "optimiser": optimiser.get_state(), "step": step, "elapsed": elapsed},
                           config, dist_info, depends)
    log_rank_agreement(out_dir, post.parameters(), dist_info)
    if dist_info.main:
        extra = {**(manifest_extra or {}), "vi_config": config.model_dump(mode="json"), "step": step,
                 "train_seconds": round(elapsed, 1), "validation": last_validation(out_dir)}
        save_posterior(bayes, out_dir / CHECKPOINT, norm_stats, extra)
    return bayes
