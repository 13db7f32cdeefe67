"""Posterior weight samples and their forecasts in one batched forward pass (docs/science.md §4).

Member k's weights are θ_k = m_k + σ ⊙ ε_k with ε_k ~ N(0, I) drawn from the generator of
(seed, "posterior-weights", k) alone (:func:`bdlens.streams.generator`), so member k is the same whether it is drawn among 4 members or among 32, and
whatever else is batched with it; m_k is μ, or for a posterior with C modes the location of
component k mod C (:class:`bdlens.bayes.MeanFieldPosterior`). The K members then run as one pass: ``torch.func.vmap`` over a
``functional_call`` of the backbone with stacked weights (linear layers become batched matmuls),
not K serial passes. θ_k is held fixed for a member's whole rollout (:class:`PosteriorEnsemble`).

Shapes: weights (K, P); states upper (B, V_u, Z, H, W) / surface (B, V_s, H, W) shared by all
members, or (K, B, …) with one state per member; outputs always (K, B, …).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from bdlens import streams
from bdlens.bayes.posterior import BayesianTransformer
from bdlens.errors import BdlensError
from bdlens.models.member_linear import member_batched

State = tuple[Tensor, Tensor]
WEIGHT_STREAM = "posterior-weights"


def sample_weights(bayes: BayesianTransformer, members: int | Sequence[int], seed: int, temperature: float = 1.0) -> Tensor:
    """Weight samples θ_k = m_k + T·σ ε_k, shape (K, P), for members ``range(members)`` or the given indices.

    m_k is the location of sample k's component (μ for a single Gaussian); the temperature T scales
    the spread around it (docs/science.md §4). ε_k is drawn on the CPU from
    :func:`bdlens.streams.generator` (so it is the same on every device) and moved to μ's device.
    """
    indices = list(range(members) if isinstance(members, int) else members)
    post = bayes.posterior
    eps = torch.stack([torch.randn(post.size, generator=streams.generator(seed, WEIGHT_STREAM, k), dtype=post.mu.dtype) for k in indices])
    return post.locations(indices) + temperature * post.sigma * eps.to(post.mu.device)


def forward_sample(
    bayes: BayesianTransformer, theta: Tensor, upper: Tensor, surface: Tensor, constants: Tensor | None = None
) -> State:
    """The backbone with one weight sample θ (P,): (B, T_in, V_u, Z, H, W), (B, T_in, V_s, H, W) → X_{t+Δ}."""
    return functional_call(bayes.base, bayes.posterior.unflatten(theta), (upper, surface, constants))


def forward_members(
    bayes: BayesianTransformer,
    weights: Tensor,
    upper: Tensor,
    surface: Tensor,
    constants: Tensor | None = None,
    chunk_size: int | None = None,
) -> State:
    """K members in one vmapped pass: weights (K, P); inputs (B, T_in, …) shared or (K, B, T_in, …).

    Returns upper (K, B, V_u, Z, H, W), surface (K, B, V_s, H, W). ``chunk_size`` bounds how many
    members run at once (memory), as in ``torch.func.vmap``.
    """
    per_member = upper.ndim == 7
    if per_member and (upper.shape[0] != weights.shape[0] or surface.shape[0] != weights.shape[0]):
        raise BdlensError(f"per-member inputs have {upper.shape[0]} members but there are {weights.shape[0]} weight samples")
    dims = 0 if per_member else None

    def member(theta: Tensor, u: Tensor, s: Tensor) -> State:
        return forward_sample(bayes, theta, u, s, constants)

    with member_batched():  # linear layers as one fused baddbmm per layer (bdlens.models.member_linear)
        return vmap(member, in_dims=(0, dims, dims), chunk_size=chunk_size)(weights, upper, surface)


class PosteriorEnsemble:
    """K posterior members with weights drawn once and kept for the whole rollout.

    :meth:`step` is the ``callable(previous, current)`` of :func:`bdlens.models.lead_time.rollout`:
    states are (upper, surface) pairs shared by all members ((B, …), e.g. the analyses) or
    per-member ((K, B, …)); it returns per-member states (K, B, …).
    """

    def __init__(
        self,
        bayes: BayesianTransformer,
        members: int | Sequence[int],
        seed: int,
        constants: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.bayes = bayes
        self.indices = list(range(members) if isinstance(members, int) else members)
        self.weights = sample_weights(bayes, self.indices, seed)
        self.constants = constants
        self.chunk_size = chunk_size

    @property
    def size(self) -> int:
        """K, the number of members."""
        return self.weights.shape[0]

    def step(self, previous: State | None, current: State) -> State:
        """(X_{t−Δ}, X_t) → X_{t+Δ} for every member; see the class docstring for shapes."""
        times = [current] if self.bayes.config.n_input_times == 1 else [previous, current]
        if any(t is None for t in times):
            raise BdlensError("this model takes two input times: pass the state at t−Δ as `previous`")
        k = self.size
        if any(t[0].ndim == 6 for t in times) and any(t[0].ndim == 5 for t in times):
            # One input per member: broadcast a shared state (e.g. the analysis at t−Δ) to all members.
            times = [(u.expand(k, *u.shape), s.expand(k, *s.shape)) if u.ndim == 5 else (u, s) for u, s in times]
        axis = times[0][0].ndim - 4  # the time axis: after B (shared) or after K, B (per member)
        upper = torch.stack([t[0] for t in times], axis)
        surface = torch.stack([t[1] for t in times], axis)
        return forward_members(self.bayes, self.weights, upper, surface, self.constants, self.chunk_size)
