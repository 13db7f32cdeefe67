"""Variational Bayesian 3DEST (docs/science.md §4): epistemic uncertainty from a posterior over the weights.

* :class:`PosteriorSettings`, :func:`from_deterministic`, :class:`BayesianTransformer`,
  :class:`MeanFieldPosterior` — mean-field Gaussian q(θ) = N(μ, diag softplus(ρ)²) over chosen
  parameters of a trained 3DEST, with a prior centred on the pretrained weights or at zero, and
  optionally further modes (:func:`with_modes`: a tied-σ mixture around independently trained models);
  :func:`save_posterior` / :func:`load_posterior` — the checkpoint directory.
* :func:`sample_weights`, :func:`forward_members`, :class:`PosteriorEnsemble` — K weight samples,
  each from its own (seed, k) generator, run as one vmapped forward pass; rollouts keep θ_k fixed.
* :func:`model_and_guide`, :func:`tempered_loss` — the tempered negative ELBO E_q[L1] + β·KL/N_D.

Post-training with pyro's SVI (``bdlens train vi``) lives in :mod:`bdlens.training.vi`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that importing bdlens.bayes for one name does not import torch and pyro
# for all of them.
_EXPORTS = {
    "model_and_guide": "objective",
    "tempered_loss": "objective",
    "SELECTIONS": "posterior",
    "BayesianTransformer": "posterior",
    "MeanFieldPosterior": "posterior",
    "PosteriorSettings": "posterior",
    "from_deterministic": "posterior",
    "load_posterior": "posterior",
    "save_posterior": "posterior",
    "with_modes": "posterior",
    "PosteriorEnsemble": "sampling",
    "forward_members": "sampling",
    "forward_sample": "sampling",
    "sample_weights": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
