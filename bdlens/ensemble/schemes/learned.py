"""The learned flow-dependent perturbation before every step (docs/science.md, "Learned perturbation").

Before a call of step Δ, the latest input state is perturbed by that step model's network,
X_t' = X_t + μ(X) + a·σ(X) ⊙ ε in the network's normalised units, ε keyed by
(seed, ``"learned-perturbation"``, member, lead of the call, init) (:mod:`bdlens.streams`), and the
wrapped source steps from (X_{t−Δ}, X_t'). Only step models with a network can be perturbed, so
the rollout of this scheme uses those step lengths only (:attr:`steps`); a lead they cannot reach
is refused by the engine before any work. ``a`` is the calibrated amplitude times the per-lead
factor of the call (1 without a per-lead calibration).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from bdlens import streams
from bdlens.data import Fields, NormStats
from bdlens.ensemble.base import Forecast, MemberSource, Wrapped
from bdlens.ensemble.schemes import SchemeContext
from bdlens.errors import BdlensError
from bdlens.models.lead_time import Call
from bdlens.perturbation.learned import PerturbationNetwork, load_perturbation

STREAM = "learned-perturbation"


class LearnedMembers(Wrapped):
    """``inner`` with the learned perturbation of its input before every step."""

    network_calls = 1

    def __init__(self, inner: MemberSource, networks: Mapping[int, tuple[PerturbationNetwork, NormStats]], context: SchemeContext):
        super().__init__(inner)
        self.networks = {s: n for s, n in networks.items() if s in inner.steps}
        if not self.networks:
            raise BdlensError(
                f"the learned perturbation has networks for {sorted(networks)} h steps but the models step {list(inner.steps)} h; "
                "train one with `bdlens train perturb` or choose another --perturbation"
            )
        self.steps = tuple(sorted(self.networks))
        self.seed, self.amplitude, self.layout = int(context.seed), float(context.amplitude), context.layout
        self.lead_factor, self.amplitude_text = context.lead_factor, context.describe_amplitude()
        self.forecast: Forecast | None = None

    def start(self, forecast: Forecast) -> None:
        super().start(forecast)
        self.forecast = forecast

    @torch.no_grad()
    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        network, stats = self.networks[call.step]
        norm = self.layout.normalise(current, stats)
        shapes = [tuple(norm.upper.shape[1:]), tuple(norm.surface.shape[1:])]
        eps = streams.normal(shapes, self.seed, STREAM, self.forecast.members, step=call.lead, init=self.forecast.init_key)
        times = [norm] if network.config.n_input_times == 1 else [self.layout.normalise(previous, stats), norm]
        mu, sigma = network(torch.stack([t.upper for t in times], 1), torch.stack([t.surface for t in times], 1))
        a = self.amplitude * self.lead_factor(call.lead)
        perturbed = Fields(*(x + m + a * s * e.to(x.dtype) for x, m, s, e in zip(norm, mu, sigma, eps, strict=True)))
        return self.inner.step(previous, self.layout.denormalise(perturbed, stats), call)

    def describe(self) -> str:
        return f"{self.inner.describe()} + learned perturbation ({self.amplitude_text})"


def build(inner: MemberSource, context: SchemeContext) -> MemberSource:
    """The registered builder: networks from ``context.settings["networks"]`` (step hours → checkpoint name)."""
    networks = {}
    for step, name in dict(context.settings.get("networks", {})).items():
        path = Path(context.checkpoints.get(name, name))
        network, manifest = load_perturbation(path)
        networks[int(step)] = (network, NormStats.from_dict(manifest["norm_stats"]))
    if not networks:
        raise BdlensError("no learned perturbation network is configured for these models; choose --perturbation sppt, ic or none")
    return LearnedMembers(inner, networks, context)
