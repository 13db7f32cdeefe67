"""Forecasts with hierarchical temporal aggregation, Dataset in, Dataset out.

The models (one per step Δ) are composed with :func:`bdlens.models.lead_time.rollout`. States travel
between models in physical units as :class:`~bdlens.data.Fields`, each model normalising with its
own statistics. Deterministic states are (B, …); posterior-ensemble states are (K, B, …), member k
keeping its own weight sample θ_k for the whole rollout.

Steppers with stochastic noise have a ``start(init_keys)`` method; before each batch's rollout they
get the batch's :func:`init_keys` (init times in whole hours since 1970), so that the noise of a
forecast depends on its init time, member and step only, not on the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.models.lead_time import rollout
from bdlens.models.pretrained import TrainedModel
from bdlens.progress import bar

PhysicalStep = Callable[[Fields | None, Fields], Fields]


class PosteriorStep:
    """One VI posterior as a physical-units step function for K members (weights drawn once)."""

    def __init__(self, directory: str | Path, members: int, seed: int, layout: FieldLayout):
        from bdlens.bayes import PosteriorEnsemble, load_posterior

        bayes, manifest = load_posterior(directory)
        if manifest.get("norm_stats") is None:
            raise BdlensError(f"posterior {directory} has no norm_stats in its manifest; retrain it with `bdlens train vi`")
        self.stats = NormStats.from_dict(manifest["norm_stats"])
        self.layout = layout
        self.step_hours = bayes.config.step_hours
        self.ensemble = PosteriorEnsemble(bayes, members, seed)

    @torch.no_grad()
    def __call__(self, previous: Fields | None, current: Fields) -> Fields:
        norm = lambda f: None if f is None else tuple(self.layout.normalise(f, self.stats))  # noqa: E731
        upper, surface = self.ensemble.step(norm(previous), norm(current))
        return self.layout.denormalise(Fields(upper, surface), self.stats)


def init_keys(init_times: Sequence[np.datetime64] | np.ndarray) -> list[int]:
    """The integer key of each init time for per-forecast noise: whole hours since 1970-01-01 (int64)."""
    times = np.asarray(init_times, dtype="datetime64[ns]")
    hours = times.astype("datetime64[h]")
    if np.any(hours != times):
        raise BdlensError(
            f"init times must be whole hours, got {np.datetime_as_string(times[hours != times][0])}; round them to the hour"
        )
    return [int(h) for h in hours.astype(np.int64)]


def _run(
    steppers: Mapping[int, PhysicalStep],
    layout: FieldLayout,
    two_times: bool,
    analysis: xr.Dataset,
    init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int],
    batch_size: int,
    members: int | None,
) -> xr.Dataset:
    offsets = [0] + ([-s for s in sorted(steppers)] if two_times else [])
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    needed = np.unique((init_times[:, None] + np.asarray(offsets, dtype="timedelta64[h]")[None, :]).ravel())
    missing = np.setdiff1d(needed, analysis.time.values)
    if missing.size:
        raise BdlensError(
            f"the analysis lacks {missing.size} time(s) the forecast needs, e.g. {np.datetime_as_string(missing[0], unit='h')}"
        )
    leads = sorted(int(h) for h in lead_hours)
    lead_coord = np.asarray(leads, dtype="timedelta64[h]").astype("timedelta64[ns]")
    stochastic = [s for s in steppers.values() if hasattr(s, "start")]  # they key their noise to the init times
    chunks = []
    with bar(total=len(init_times), desc="forecast", unit="init") as progress:
        for start in range(0, len(init_times), batch_size):
            batch = init_times[start : start + batch_size]
            for stepper in stochastic:
                stepper.start(init_keys(batch))
            history = {off: layout.to_tensors(analysis.sel(time=batch + np.timedelta64(off, "h"))) for off in offsets}
            states = dict(rollout(steppers, history, leads, two_times))
            lead_axis = 0 if members is None else 1  # (L, B, …) or (K, L, B, …)
            upper = torch.stack([states[lead].upper for lead in leads], lead_axis)
            surface = torch.stack([states[lead].surface for lead in leads], lead_axis)
            if members is None:
                coords = {"prediction_timedelta": lead_coord, "time": batch}
            else:
                coords = {"number": np.arange(members), "prediction_timedelta": lead_coord, "time": batch}
            fields = Fields(upper.reshape(-1, *upper.shape[-4:]), surface.reshape(-1, *surface.shape[-3:]))
            chunks.append(layout.from_tensors(fields, coords))
            progress.update(len(batch))
    order = ("time", "prediction_timedelta") if members is None else ("number", "time", "prediction_timedelta")
    return xr.concat(chunks, dim="time").transpose(*order, ...)


def deterministic_forecast(
    models: Mapping[int, TrainedModel],
    analysis: xr.Dataset,
    init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int],
    batch_size: int = 16,
) -> xr.Dataset:
    """Forecast from ``analysis`` at ``init_times`` to ``lead_hours``.

    ``models``: step hours → trained model (all on the same layout). ``analysis``: canonical Dataset
    holding the init times and, for two-input-time models, the times Δ before them. Returns dims
    (time, prediction_timedelta, [level,] latitude, longitude), physical units.
    """
    if not models:
        raise BdlensError("no models given")
    first = next(iter(models.values()))
    for step, m in models.items():
        if m.step_hours != step or m.layout != first.layout:
            raise BdlensError(f"model for {step} h has step {m.step_hours} h or a different field layout than the others")
    steppers = {s: m.step for s, m in models.items()}
    two_times = first.model.config.n_input_times == 2
    return _run(steppers, first.layout, two_times, analysis, init_times, lead_hours, batch_size, None)


def posterior_forecast(
    posteriors: Mapping[int, str | Path],
    layout: FieldLayout,
    analysis: xr.Dataset,
    init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int],
    members: int,
    seed: int = 0,
    batch_size: int = 8,
) -> xr.Dataset:
    """K-member forecast from VI posteriors (step hours → posterior directory); member k uses weight
    sample k of each posterior (drawn from (seed, k) only) for its whole rollout. Dims (number, time,
    prediction_timedelta, …)."""
    steppers = {step: PosteriorStep(path, members, seed, layout) for step, path in posteriors.items()}
    for step, stepper in steppers.items():
        if stepper.step_hours != step:
            raise BdlensError(f"posterior given for {step} h was trained for {stepper.step_hours} h")
    two_times = next(iter(steppers.values())).ensemble.bayes.config.n_input_times == 2
    return _run(steppers, layout, two_times, analysis, init_times, lead_hours, batch_size, members)


def hybrid_forecast(
    posterior: str | Path,
    perturbation: str | Path,
    layout: FieldLayout,
    analysis: xr.Dataset,
    init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int],
    weight_samples: int,
    draws: int,
    seed: int = 0,
    batch_size: int = 8,
) -> xr.Dataset:
    """K × J hybrid ensemble: K weight samples of a VI posterior, each with J draws of its learned perturbation.

    ``posterior`` and ``perturbation`` are one step model pair (e.g. the bundled ``vi_6h`` and
    ``perturb_6h``); every step perturbs, so leads are multiples of its step. Member i = k·J + j
    keeps weight sample θ_k (from ``seed`` and k) and perturbation stream j (from ``seed`` and j) for
    the whole rollout. Dims (number, time, prediction_timedelta, …) with the design coordinates
    ``weight_sample`` (k) and ``perturbation_draw`` (j) on ``number``, as
    :func:`bdlens.uncertainty.decompose` and :func:`bdlens.uncertainty_maps` read them.
    """
    from bdlens.perturbation.learned import LearnedPerturbationStep

    if weight_samples < 1 or draws < 1:
        raise BdlensError(f"weight_samples and draws must be at least 1, got {weight_samples} and {draws}")
    parts = []
    for j in range(draws):
        noise_seed = int(np.random.SeedSequence([seed, j]).generate_state(1)[0])
        step = LearnedPerturbationStep(posterior, perturbation, weight_samples, seed, layout, noise_seed=noise_seed)
        two_times = step.ensemble.bayes.config.n_input_times == 2
        part = _run({step.step_hours: step}, layout, two_times, analysis, init_times, lead_hours, batch_size, weight_samples)
        parts.append(part.assign_coords(number=np.arange(weight_samples) * draws + j))
    ensemble = xr.concat(parts, dim="number").sortby("number")
    number = ensemble["number"].values
    return ensemble.assign_coords(weight_sample=("number", number // draws), perturbation_draw=("number", number % draws))
