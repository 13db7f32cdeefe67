"""Bred-vector initial perturbations (Toth & Kalnay 1993): the growing directions of the flow.

Each member breeds its own perturbation with the rescale-and-cycle loop of
:func:`bdlens.perturbation.initial.bred_vectors`, run by the wrapped source's own step model of the
shortest step Δ (so posterior members breed with their own weights): a control starts from the
analyses at −(c+1)Δ and −cΔ (c = ``cycles``, default 4, a 24 h breeding window with 6 h steps) and
runs freely to the init; the member starts from the control plus white noise of its own stream
(seed, ``"breeding"``, member, 0, init) and, after every step, its difference from the control is
rescaled to rms = amplitude × ``fraction`` (default 0.05) in normalised units (each field in units
of its climatological std), as the IC random fields are. The bred pair (δ_{−Δ}, δ_0) is added to
the analyses at −Δ and at the init; the step models' other history times (e.g. −24 h) get δ_0 (a
shifted trajectory, as for :mod:`.initial`). After the start the wrapped source runs unperturbed.

Needs the analyses at −(c+1)Δ and −cΔ besides the usual history (:attr:`BredMembers.extra_history`).
"""

from __future__ import annotations

from bdlens.data import Fields
from bdlens.ensemble.base import Forecast, History, MemberSource, Wrapped
from bdlens.ensemble.schemes import SchemeContext
from bdlens.errors import BdlensError
from bdlens.models.lead_time import Call
from bdlens.perturbation.initial import bred_vectors


class BredMembers(Wrapped):
    """``inner`` started from analyses plus bred vectors (see the module docstring)."""

    def __init__(self, inner: MemberSource, context: SchemeContext) -> None:
        super().__init__(inner)
        self.cycles = int(context.settings.get("cycles", 4))
        if self.cycles < 1:
            raise BdlensError(f"bred vectors need at least one breeding cycle, got cycles = {self.cycles}")
        self.amplitude = float(context.amplitude)
        self.size = self.amplitude * float(context.settings.get("fraction", 0.05))
        self.delta = min(inner.steps)
        self.own = {0} | ({-s for s in inner.steps} if inner.n_input_times == 2 else set())
        self.layout, self.stats, self.seed = context.layout, context.stats[self.delta], int(context.seed)
        window = [-(self.cycles + 1) * self.delta] if inner.n_input_times == 2 else []
        #: analyses besides the rollout's own history (hours relative to the init)
        self.extra_history = (*window, -self.cycles * self.delta)
        self.forecast: Forecast | None = None
        self.calls = 0

    def start(self, forecast: Forecast) -> None:
        super().start(forecast)
        self.forecast = forecast

    def _step(self, previous: tuple, current: tuple) -> tuple:
        """One breeding step of the wrapped source in normalised units (the control's and the
        perturbed members' steps alternate, so every second call moves on by Δ)."""
        lead = (self.calls // 2 - self.cycles + 1) * self.delta
        self.calls += 1
        call = Call(self.delta, lead, lead - self.delta, lead - 2 * self.delta)
        physical = [self.layout.denormalise(Fields(*state), self.stats) for state in (previous, current)]
        return tuple(self.layout.normalise(self.inner.step(*physical, call), self.stats))

    def initial(self, history: History) -> History:
        d, c = self.delta, self.cycles
        control = [tuple(self.layout.normalise(history[off], self.stats)) for off in (-(c + 1) * d, -c * d)]
        self.calls = 0
        bred = bred_vectors(self._step, *control, amplitude=self.size, cycles=c, seed=self.seed, members=self.forecast.members,
                            init=self.forecast.init_key)
        std = self.layout.norm_tensors(self.stats)
        pair = {-d: bred.prev, 0: bred.cur}
        perturbed = {}
        for off, state in history.items():
            if off not in self.own:
                continue  # breeding window only: the rollout does not read it
            delta = pair.get(off, bred.cur)
            perturbed[off] = Fields(state.upper + delta[0] * std.upper_std, state.surface + delta[1] * std.surface_std)
        return self.inner.initial(perturbed)

    def describe(self) -> str:
        return f"{self.inner.describe()} + bred vectors ({self.cycles} × {self.delta} h, amplitude {self.amplitude:.3g})"


def build(inner: MemberSource, context: SchemeContext) -> MemberSource:
    """The registered builder (:data:`bdlens.ensemble.schemes.SCHEMES`)."""
    return BredMembers(inner, context)
