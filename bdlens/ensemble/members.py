"""Backbone member sources (deterministic 3DEST weights, VI posterior weight samples) and the
references without a network (persistence, climatology).

Both take physical states (N, …) and run one step model per call of the rollout, each model with
its own normalisation statistics. Perturbation schemes wrap them (:mod:`bdlens.ensemble.schemes`).

Posterior members (docs/ensemble.md): member i uses weight sample k = i // J of *every* step model,
θ_k = m_k + T·σ ⊙ ε_k with ε_k from (seed, ``"posterior-weights"``, k) (:mod:`bdlens.streams`) and m_k
μ or, for a posterior with C modes, mode k mod C (:func:`bdlens.bayes.sample_weights`), the
same for every init, held for the whole rollout (docs/science.md, "Epistemic part"). The members of a
batch are whole weight groups (the engine aligns batches to J), so the J draws of θ_k run in one
vmapped pass with the batch axis holding the draws (:func:`bdlens.bayes.forward_members`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bdlens import streams
from bdlens.bayes import BayesianTransformer
from bdlens.bayes.sampling import forward_members, sample_weights
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.ensemble.base import Forecast, History, MemberSource
from bdlens.ensemble.design import Design
from bdlens.errors import BdlensError
from bdlens.models.lead_time import Call
from bdlens.models.pretrained import TrainedModel


def _two_times(n_input_times: set[int]) -> int:
    if len(n_input_times) != 1:
        raise BdlensError("the step models disagree on the number of input times; use models trained together")
    return n_input_times.pop()


def _times(previous: Fields | None, current: Fields, n_input_times: int) -> list[Fields]:
    if n_input_times == 1:
        return [current]
    if previous is None:
        raise BdlensError("this model takes two input times: the rollout must pass the state at t−Δ")
    return [previous, current]


class DeterministicMembers:
    """Every member runs the same deterministic 3DEST weights (aleatoric-only and IC-perturbed systems)."""

    network_evaluations = 1

    def __init__(self, models: Mapping[int, TrainedModel]) -> None:
        if not models:
            raise BdlensError("no deterministic models given")
        self.models = dict(models)
        self.steps = tuple(sorted(self.models))
        self.n_input_times = _two_times({m.model.config.n_input_times for m in self.models.values()})

    def start(self, forecast: Forecast) -> None:
        pass

    def initial(self, history: History) -> History:
        return history

    @torch.no_grad()
    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        model = self.models[call.step]
        return model.step(previous if self.n_input_times == 2 else None, current)

    def describe(self) -> str:
        return "deterministic"


@dataclass
class PosteriorModel:
    """One step model's VI posterior with what it needs on physical fields."""

    bayes: BayesianTransformer
    layout: FieldLayout
    stats: NormStats
    #: the normalisation statistics of modes 1 … C − 1 (each was trained with its own); empty: ``stats`` for all
    mode_stats: tuple[NormStats, ...] = ()

    def component_stats(self, component: int) -> NormStats:
        """The statistics that mixture component ``component`` normalises its inputs and outputs with."""
        return self.stats if component == 0 or not self.mode_stats else self.mode_stats[component - 1]


def posterior_model(bayes: BayesianTransformer, layout: FieldLayout, manifest: Mapping[str, Any], path: Any) -> PosteriorModel:
    """A loaded posterior (:func:`bdlens.bayes.load_posterior`) with the statistics its manifest records."""
    if manifest.get("norm_stats") is None:
        raise BdlensError(f"posterior {path} has no norm_stats in its manifest; retrain it with `bdlens train vi`")
    modes = manifest.get("mode_norm_stats") or []
    if modes and len(modes) != bayes.posterior.components - 1:
        raise BdlensError(f"posterior {path} records statistics for {len(modes)} modes but has {bayes.posterior.components - 1}; rebuild it with `bdlens train modes`")
    return PosteriorModel(bayes, layout, NormStats.from_dict(manifest["norm_stats"]), tuple(NormStats.from_dict(m) for m in modes))


class PosteriorMembers:
    """Members with posterior weight samples: member i uses θ_{i // J} (see the module docstring)."""

    network_evaluations = 1

    def __init__(self, models: Mapping[int, PosteriorModel], design: Design, seed: int, temperature: float = 1.0) -> None:
        if not models:
            raise BdlensError("no posteriors given")
        if not temperature > 0:
            raise BdlensError(f"the posterior temperature must be positive, got {temperature}")
        self.models = dict(models)
        self.design, self.seed, self.temperature = design, int(seed), float(temperature)
        self.steps = tuple(sorted(self.models))
        self.n_input_times = _two_times({m.bayes.config.n_input_times for m in self.models.values()})
        self.weights: dict[int, torch.Tensor] = {}
        self.groups = 0
        self.components: dict[int, list[int]] = {}  # per step model: the mixture component of each weight group of the batch

    def start(self, forecast: Forecast) -> None:
        members = forecast.members
        draws = self.design.draws
        if len(members) % draws or members[0] % draws or list(members) != list(range(members[0], members[0] + len(members))):
            raise BdlensError(f"a posterior batch must hold whole weight groups of {draws} consecutive members, got {members[:4]}…")
        ks = sorted(set(self.design.weight_sample(members).tolist()))
        self.groups = len(ks)
        # θ_k = m_k + T·σ ε_k (drawn per batch, not cached: memory stays flat however large K is).
        self.weights = {step: sample_weights(model.bayes, ks, self.seed, self.temperature).detach() for step, model in self.models.items()}
        self.components = {step: [k % model.bayes.posterior.components for k in ks] for step, model in self.models.items()}

    def initial(self, history: History) -> History:
        return history

    @torch.no_grad()
    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        model = self.models[call.step]
        n = current.upper.shape[0]
        k, j = self.groups, n // self.groups
        stats = [model.component_stats(c) for c in self.components[call.step]]
        norm = [self._per_group(f, stats, j, model.layout.normalise) for f in _times(previous, current, self.n_input_times)]
        # (N, …) → (K_b, J, T, …): the draws of one weight sample are the batch of its vmapped pass.
        upper = torch.stack([f.upper for f in norm], 1).reshape(k, j, len(norm), *current.upper.shape[1:])
        surface = torch.stack([f.surface for f in norm], 1).reshape(k, j, len(norm), *current.surface.shape[1:])
        out_upper, out_surface = forward_members(model.bayes, self.weights[call.step], upper, surface)
        out = Fields(out_upper.reshape(n, *out_upper.shape[2:]), out_surface.reshape(n, *out_surface.shape[2:]))
        return self._per_group(out, stats, j, model.layout.denormalise)

    @staticmethod
    def _per_group(fields: Fields, stats: list[NormStats], size: int, transform: Any) -> Fields:
        """``transform(fields, stats)`` with each group of ``size`` consecutive members under its own statistics:
        one call per distinct statistics (at most C), not per group, since the groups cycle through the modes."""
        if all(s is stats[0] for s in stats):
            return transform(fields, stats[0])
        upper, surface = torch.empty_like(fields.upper), torch.empty_like(fields.surface)
        for own in {id(s): s for s in stats}.values():
            rows = torch.tensor([g * size + j for g, s in enumerate(stats) if s is own for j in range(size)], device=fields.upper.device)
            part = transform(Fields(fields.upper[rows], fields.surface[rows]), own)
            upper[rows], surface[rows] = part.upper, part.surface
        return Fields(upper, surface)

    def describe(self) -> str:
        notes = [f"{m.bayes.posterior.components} modes at {s} h" for s, m in self.models.items() if m.bayes.posterior.components > 1]
        notes += [f"temperature {self.temperature:g}"] if self.temperature != 1.0 else []
        return "posterior" + (f" ({', '.join(notes)})" if notes else "")


class PersistenceMembers:
    """The persistence reference: every lead repeats the initial state (no network, one step of any length)."""

    network_evaluations = 0
    n_input_times = 1

    def __init__(self, template: MemberSource) -> None:
        self.models = template.models  # layout of the fields, for the engine
        self.steps = (min(template.steps),)

    def start(self, forecast: Forecast) -> None:
        pass

    def initial(self, history: History) -> History:
        return history

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        return current

    def describe(self) -> str:
        return "persistence"


class ClimatologyMembers:
    """The climatological reference: member m follows a past trajectory of the data (an analogue).

    For the forecast from init t₀, member m draws one start time τ_m from the ``candidates`` (the
    data's times in the training period at the same hour of day as t₀ and within ``window_days`` of
    t₀'s day of year in any year, with the whole forecast range after it), uniformly from the stream
    (seed, ``"climatology"``, m, 0, t₀) of :mod:`bdlens.streams`; its state at lead L is the data at
    τ_m + L. Every lead is thus a state drawn from the season's climatology and the members keep the
    temporal coherence of real weather. No network is run.
    """

    network_evaluations = 0
    n_input_times = 1

    def __init__(self, template: MemberSource, data: Any, train: tuple[np.datetime64, np.datetime64], seed: int,
                 max_lead_hours: int, inits: Any = (), window_days: float = 45.0) -> None:
        self.models = template.models  # layout of the fields, for the engine
        self.steps = (min(template.steps),)
        self.layout = next(iter(self.models.values())).layout
        self.data, self.seed, self.window = data, int(seed), float(window_days)
        times = data.time.values.astype("datetime64[h]")
        start, end = (np.datetime64(t, "h") for t in train)
        self.times = times[(times >= start) & (times + np.timedelta64(max_lead_hours, "h") <= end)]
        self.available = set(times.tolist())
        self.max_lead = int(max_lead_hours)
        self.starts: dict[int, np.datetime64] = {}
        self._candidates: dict[np.datetime64, np.ndarray] = {}  # per init: every batch of its members draws from them
        for init in inits:  # refused before any work: the forecast's inits must all have analogues
            self.candidates(init)

    def candidates(self, init: np.datetime64) -> np.ndarray:
        """Possible start times τ for a forecast from ``init`` (see the class docstring)."""
        init = np.datetime64(init, "h")
        if init in self._candidates:
            return self._candidates[init]
        hour = (self.times - self.times.astype("datetime64[D]")).astype(int)
        day = (self.times.astype("datetime64[D]") - self.times.astype("datetime64[Y]")).astype(int)
        init_day = int((init.astype("datetime64[D]") - init.astype("datetime64[Y]")).astype(int))
        distance = np.abs(day - init_day)
        distance = np.minimum(distance, 365 - distance)
        keep = (hour == int((init - init.astype("datetime64[D]")).astype(int))) & (distance <= self.window)
        keep &= np.array([all((t + np.timedelta64(h, "h")).tolist() in self.available for h in (0, self.max_lead)) for t in self.times], dtype=bool)
        found = self.times[keep]
        if len(found) == 0:
            raise BdlensError(
                "--model climatology draws past states from the training period of the data, but the data has none for this "
                "season and lead; pass --data with the training years (e.g. the world's analysis.zarr)"
            )
        self._candidates[init] = found
        return found

    def start(self, forecast: Forecast) -> None:
        init = np.datetime64(int(forecast.init_key), "h")
        options = self.candidates(init)
        picks = {m: int(torch.randint(len(options), (), generator=streams.generator(self.seed, "climatology", m, 0, forecast.init_key)))
                 for m in forecast.members}
        self.starts = {m: options[p] for m, p in picks.items()}
        self.members = forecast.members

    def initial(self, history: History) -> History:
        return history

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        times = [self.starts[m] + np.timedelta64(call.lead, "h") for m in self.members]
        state = self.layout.to_tensors(self.data.sel(time=np.array(times, dtype="datetime64[ns]")))
        return Fields(*(x.to(current.upper.device, current.upper.dtype) for x in state))

    def describe(self) -> str:
        return "climatology (analogue trajectories from the training years)"
