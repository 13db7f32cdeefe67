"""SPPT on every step model's tendency: X_{t+Δ} = X_t + (1 + μ(p)·r)·(f(X) − X_t) (docs/science.md, "SPPT").

Every member has its own multi-scale pattern r (:class:`bdlens.perturbation.SPPT`), AR(1) in time:
the pattern of the state at lead L is the pattern of the call's input state advanced by the call's
step Δ (φ = exp(−Δ/τ) per scale), with fresh noise keyed by (seed, ``"sppt"``, member, L, init), so
24 h and 6 h steps are both perturbed, each with the time correlation of its own step. The pattern
of the initial state is drawn from the stationary distribution (key L = 0). ``amplitude`` multiplies
every scale's σ (the clip to [−1, 1] stays); a per-lead calibration multiplies the pattern of the
call ending at lead L by its factor f(L), clipped again, so the AR(1) memory is kept while the
strength of the perturbation follows the lead. With the config's ``activity_cap`` the perturbation
is shrunk where it would make a member more active than the analysis it started from
(:func:`bdlens.perturbation.sppt.limit_activity`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from bdlens.data import Fields
from bdlens.ensemble.base import Forecast, History, MemberSource, Wrapped
from bdlens.ensemble.schemes import SchemeContext
from bdlens.models.lead_time import Call
from bdlens.perturbation.patterns import PatternState, UnresolvedScaleWarning
from bdlens.perturbation.sppt import SPPT, apply_sppt, eddy_variance, load_sppt_config

STREAM = "sppt"


class SPPTMembers(Wrapped):
    """``inner`` with SPPT applied after every step (see the module docstring)."""

    def __init__(self, inner: MemberSource, context: SchemeContext) -> None:
        super().__init__(inner)
        config = load_sppt_config(context.settings.get("config", "perturbation_sppt"))
        scales = [s.model_copy(update={"sigma": s.sigma * context.amplitude}) for s in config.scales]
        layout = context.layout
        with warnings.catch_warnings():  # the unresolved 500 km scale is documented in the config, not news
            warnings.simplefilter("ignore", UnresolvedScaleWarning)
            self.sppt = {
                step: SPPT(layout.grid, layout.levels, layout.upper_variables, layout.surface_variables,
                           config.model_copy(update={"scales": scales, "dt_hours": float(step)}))
                for step in self.steps
            }
        self.latitude = next(iter(self.sppt.values())).pattern.grid.latitudes()
        self.seed, self.amplitude, self.lead_factor = int(context.seed), float(context.amplitude), context.lead_factor
        self.amplitude_text = context.describe_amplitude()
        self.patterns: dict[int, PatternState] = {}
        self.last_use: dict[int, int] = {}
        self.forecast: Forecast | None = None
        self.cap: torch.Tensor | None = None  # (members, fields) eddy variances, set by initial()

    def initial(self, history: History) -> History:
        """The inner source's history; with ``activity_cap``, the members' analysis (offset 0) also sets
        the eddy variances their perturbed fields may reach."""
        cap = next(iter(self.sppt.values())).config.activity_cap
        if cap is not None:
            analysis = history[0]
            self.cap = cap**2 * eddy_variance(analysis.upper, analysis.surface, self.latitude)
        return super().initial(history)

    def start(self, forecast: Forecast) -> None:
        super().start(forecast)
        self.forecast = forecast
        first = next(iter(self.sppt.values()))
        self.patterns = {0: first.init(self.seed, forecast.members, inits=(forecast.init_key,))}
        # Pattern states are dropped once no later call starts from their lead (memory stays flat).
        self.last_use = {c.current: i for i, c in enumerate(forecast.plan)}
        self.calls = 0

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        forecast = self.inner.step(previous, current, call)
        sppt = self.sppt[call.step]
        # The pattern's own counter keys its noise: set it so that the advanced state draws key = lead.
        parent = replace(self.patterns[call.current], step=call.lead - 1)
        pattern = sppt.step(parent)
        if call.lead in self.last_use:
            self.patterns[call.lead] = pattern
        if self.last_use.get(call.current, -1) <= self.calls:
            self.patterns.pop(call.current, None)
        self.calls += 1
        r = sppt.pattern.field(pattern)[:, 0].to(current.upper.dtype)
        factor = self.lead_factor(call.lead)
        if factor != 1.0:
            clip = sppt.config.clip
            r = r * factor if clip is None else (r * factor).clamp(-clip, clip)
        upper, surface = apply_sppt(
            current.upper, current.surface, forecast.upper, forecast.surface, r,
            levels_hpa=sppt.levels_hpa, upper_variables=sppt.upper_variables, surface_variables=sppt.surface_variables,
            latitude=self.latitude, config=sppt.config, activity=self.cap,
        )
        return Fields(upper, surface)

    def describe(self) -> str:
        return f"{self.inner.describe()} + sppt ({self.amplitude_text})"


def build(inner: MemberSource, context: SchemeContext) -> MemberSource:
    """The registered builder (:data:`bdlens.ensemble.schemes.SCHEMES`)."""
    return SPPTMembers(inner, context)

