"""The member-source protocol: the one way anything that makes ensemble members plugs into the engine.

A *member source* advances the members of one forecast (one init time) by one model step. States
are physical-unit :class:`~bdlens.data.Fields` with one row per member of the batch: upper
(N, V_u, Z, H, W), surface (N, V_s, H, W), N = ``len(members)``. The engine
(:mod:`bdlens.ensemble.engine`) plans the hierarchical rollout (:func:`bdlens.models.lead_time.plan_rollout`)
over the step lengths the source offers and calls, for every forecast batch:

    source.start(Forecast(init_key, members, plan))
    history = source.initial(history)                 # e.g. initial-condition perturbations
    next = source.step(previous, current, call)       # for every call of the plan

``call`` (:class:`~bdlens.models.lead_time.Call`) says which step model runs and which lead it
produces; stochastic sources key every draw to (seed, stream, init key, member, ``call.lead``)
through :mod:`bdlens.streams`, so member i's values never depend on its batch.

Backbones (deterministic weights, posterior weight samples, a diffusion sampler, persistence)
implement the protocol directly; perturbation schemes wrap another source (:class:`Wrapped`) and
register in :mod:`bdlens.ensemble.schemes`. Member i of a K × J design is weight sample ``i // J``
and perturbation draw ``i % J`` (:class:`bdlens.ensemble.design.Design`); see docs/ensemble.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bdlens.data import Fields
from bdlens.models.lead_time import Call

History = Mapping[int, Fields]


@dataclass(frozen=True)
class Forecast:
    """What a batch computes: the init key (hours since 1970), the member indices of its rows and the plan."""

    init_key: int
    members: tuple[int, ...]
    plan: tuple[Call, ...] = field(default=())


@runtime_checkable
class MemberSource(Protocol):
    """Anything that steps ensemble members (see the module docstring for shapes and the call order)."""

    steps: tuple[int, ...]
    """Step lengths (hours) this source can take; the rollout composes them greedily."""
    n_input_times: int
    """1 (X_t → X_{t+Δ}) or 2 ((X_{t−Δ}, X_t) → X_{t+Δ})."""
    network_evaluations: int
    """Backbone network evaluations per member and step (1 for a 3DEST step, 2N − 1 for Heun with N steps)."""
    # Optional: ``extra_history``, hours before the init of analyses the source needs besides its step
    # models' inputs (the bred vectors' breeding window); :func:`bdlens.ensemble.rollout.history_offsets`
    # reads it. Not a protocol member, so sources that need none need not declare it.

    def start(self, forecast: Forecast) -> None:
        """Prepare the draws of the next batch (weight samples, noise keys, pattern states)."""

    def initial(self, history: History) -> History:
        """The per-member history (offset hours → (N, …) states) the rollout starts from."""

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        """The members' states at ``call.lead`` from those at ``call.previous`` and ``call.current``."""

    def describe(self) -> str:
        """A short name of the system, e.g. ``"posterior + sppt"``."""


class Wrapped:
    """Base of perturbation schemes: a member source that wraps another and forwards what it does not change."""

    def __init__(self, inner: MemberSource) -> None:
        self.inner = inner
        self.steps = inner.steps
        self.n_input_times = inner.n_input_times
        self.network_evaluations = inner.network_evaluations

    def start(self, forecast: Forecast) -> None:
        self.inner.start(forecast)

    def initial(self, history: History) -> History:
        return self.inner.initial(history)

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        return self.inner.step(previous, current, call)

    def describe(self) -> str:
        return self.inner.describe()
