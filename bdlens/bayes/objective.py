"""The tempered negative ELBO of docs/science.md §4 as a pyro model and guide.

    L(μ, ρ) = E_q[ℓ(θ; batch)] + β · KL(q ‖ p) / N_D

with ℓ the backbone's latitude- and variable-weighted L1 loss (:mod:`bdlens.models.loss`) on one
batch, q = N(μ, diag σ²), σ = softplus(ρ), N_D the training-set size and β the tempering factor
(published setting 1e-4). The model samples θ from the prior and adds −ℓ as a ``pyro.factor``; the
guide samples θ = μ + σ ε (reparameterised). Both weight sites are scaled by β/N_D, so pyro's
``TraceMeanField_ELBO`` — which uses the closed-form Gaussian KL for this site — returns exactly L.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pyro
import pyro.poutine as poutine
from torch import Tensor

from bdlens.bayes.posterior import BayesianTransformer
from bdlens.bayes.sampling import forward_sample
from bdlens.data.tensors import Fields
from bdlens.errors import BdlensError
from bdlens.models import WeightedL1Loss

Batch = tuple[Fields, Fields]
"""(inputs with the input times stacked on axis 1: upper (B, T_in, V, Z, H, W), surface (B, T_in, V, H, W); target Fields),
as :func:`bdlens.training.batches.collate` returns them."""
SITE = "theta"


def kl_scale(beta: float, n_data: int) -> float:
    """β / N_D, the weight of KL(q ‖ p) in the per-sample objective."""
    if beta < 0 or n_data < 1:
        raise BdlensError(f"need β ≥ 0 and a training-set size N_D ≥ 1, got β={beta}, N_D={n_data}")
    return beta / n_data


def batch_loss(bayes: BayesianTransformer, theta: Tensor, loss_fn: WeightedL1Loss, batch: Batch, constants: Tensor | None = None) -> Tensor:
    """ℓ(θ; batch): the weighted L1 loss of the backbone with weights θ (P,) on one collated batch."""
    inputs, target = batch
    return loss_fn(forward_sample(bayes, theta, inputs.upper, inputs.surface, constants), (target.upper, target.surface))


def model_and_guide(
    bayes: BayesianTransformer, loss_fn: WeightedL1Loss, beta: float, n_data: int, constants: Tensor | None = None,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Callable[[Batch], None], Callable[[Batch], None]]:
    """The pyro (model, guide) pair whose ``TraceMeanField_ELBO`` loss is the tempered negative ELBO.

    ``forward_context()`` is entered around the backbone's forward pass and loss only (e.g. bf16
    autocast, :func:`bdlens.devices.autocast`), not around the KL or pyro's backward pass."""
    scale = kl_scale(beta, n_data)
    post = bayes.posterior

    def model(batch: Batch) -> None:
        with poutine.scale(scale=scale):
            theta = pyro.sample(SITE, post.prior())
        with forward_context():
            loss = batch_loss(bayes, theta, loss_fn, batch, constants)
        pyro.factor("data", -loss.float())

    def guide(batch: Batch) -> None:
        pyro.module("posterior", post)
        with poutine.scale(scale=scale):
            pyro.sample(SITE, post.distribution())

    return model, guide


def tempered_loss(
    bayes: BayesianTransformer, theta: Tensor, loss_fn: WeightedL1Loss, batch: Batch, beta: float, n_data: int,
    constants: Tensor | None = None,
) -> Tensor:
    """ℓ(θ; batch) + β·KL(q‖p)/N_D for one reparameterised sample θ — the same objective without pyro's
    tracing (the reference for the SVI loss and the hand-written step in the overhead benchmark)."""
    return batch_loss(bayes, theta, loss_fn, batch, constants) + kl_scale(beta, n_data) * bayes.posterior.kl()
