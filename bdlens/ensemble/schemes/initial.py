"""Initial-condition perturbations: every member starts from the analysis plus its own random field.

Member i's perturbation is a spherical Gaussian random field (docs/science.md, "Random patterns"),
independent for every variable and level, with correlation length ``length_km`` (default 800 km,
the demo world's analysis-error scale) and grid-point std = amplitude × ``fraction`` × the model's
climatological std of that field (its normalisation statistics), keyed by
(seed, ``"initial-condition"``, member, 0, init). The same perturbation is added to every input time
of the history (a shifted trajectory, not noise between the two inputs). After the start the wrapped
source runs unperturbed.
"""

from __future__ import annotations

import math

from bdlens.data import Fields
from bdlens.ensemble.base import Forecast, History, MemberSource, Wrapped
from bdlens.ensemble.schemes import SchemeContext
from bdlens.perturbation.patterns import PatternScale, SphericalPattern

STREAM = "initial-condition"


class InitialConditionMembers(Wrapped):
    """``inner`` started from perturbed analyses (see the module docstring)."""

    def __init__(self, inner: MemberSource, context: SchemeContext) -> None:
        super().__init__(inner)
        layout = context.layout
        self.layout, self.seed, self.amplitude = layout, int(context.seed), float(context.amplitude)
        self.fraction = float(context.settings.get("fraction", 0.05))
        length = float(context.settings.get("length_km", 800.0))
        self.pattern = SphericalPattern(layout.grid, [PatternScale(1.0, math.inf, length)], clip=None)
        stats = context.stats[min(context.stats)]
        norms = layout.norm_tensors(stats)
        scale = self.amplitude * self.fraction
        self.std = Fields(norms.upper_std * scale, norms.surface_std * scale)
        self.forecast: Forecast | None = None

    def start(self, forecast: Forecast) -> None:
        super().start(forecast)
        self.forecast = forecast

    def initial(self, history: History) -> History:
        layout = self.layout
        n_upper = len(layout.upper_variables) * len(layout.levels)
        channels = n_upper + len(layout.surface_variables)
        state = self.pattern.init(self.seed, self.forecast.members, channels=channels, stream=STREAM, inits=(self.forecast.init_key,))
        fields = self.pattern.field(state)  # (N, channels, H, W), unit std
        n, _, h, w = fields.shape
        delta = Fields(fields[:, :n_upper].reshape(n, *self.std.upper.shape[:2], h, w) * self.std.upper,
                       fields[:, n_upper:] * self.std.surface)
        perturbed = {off: Fields(*(x + d.to(x.dtype) for x, d in zip(f, delta, strict=True))) for off, f in history.items()}
        return self.inner.initial(perturbed)

    def describe(self) -> str:
        return f"{self.inner.describe()} + initial-condition fields (amplitude {self.amplitude:.3g})"


def build(inner: MemberSource, context: SchemeContext) -> MemberSource:
    """The registered builder (:data:`bdlens.ensemble.schemes.SCHEMES`)."""
    return InitialConditionMembers(inner, context)


