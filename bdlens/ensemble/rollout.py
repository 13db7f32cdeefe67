"""The hierarchical rollout of any member source, and in-memory forecasts built on it.

:func:`member_states` runs one forecast (one init, a batch of members) of a
:class:`~bdlens.ensemble.base.MemberSource` through the anchored greedy plan of
:func:`bdlens.models.lead_time.plan_rollout` (docs/science.md §3) and yields each output lead's
state as it is reached. The engine streams those states to its store; :func:`forecast_members`
collects them into a Dataset for small, in-memory uses (evaluation scripts, examples), and
:func:`deterministic_forecast` / :func:`posterior_forecast` are its two common cases.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from bdlens import streams
from bdlens.bayes import load_posterior
from bdlens.data import FieldLayout, Fields
from bdlens.ensemble.base import Forecast, MemberSource
from bdlens.ensemble.design import Design
from bdlens.ensemble.members import DeterministicMembers, PosteriorMembers, posterior_model
from bdlens.errors import BdlensError
from bdlens.models.lead_time import plan_rollout, rollout
from bdlens.models.pretrained import TrainedModel


def history_offsets(source: MemberSource) -> list[int]:
    """Hours relative to the init of the analyses a rollout of ``source`` starts from (with any
    ``extra_history`` a scheme needs, e.g. the bred vectors' breeding window)."""
    own = [0] + ([-s for s in source.steps] if source.n_input_times == 2 else [])
    return sorted(set(own) | set(getattr(source, "extra_history", ())), reverse=True)


def _iso(t: np.datetime64) -> str:
    return np.datetime_as_string(np.datetime64(t, "m"), unit="m")


def initial_states(analysis: xr.Dataset, layout: FieldLayout, init_times: np.ndarray, offsets: Sequence[int]) -> dict[int, Fields]:
    """The analyses each init needs (offset hours → (I, …) states), checked for presence and NaN."""
    needed = {off: init_times + np.timedelta64(off, "h") for off in offsets}
    have = analysis.time.values.astype("datetime64[ns]")
    for off, times in needed.items():
        for t, t0 in zip(times, init_times, strict=True):
            if not np.isin(t, have):
                what = "the init time" if off == 0 else f"the state {-off} h before init {_iso(t0)}"
                raise BdlensError(f"the data has no analysis at {_iso(t)} ({what}); choose --init times the data covers")
    states = {off: layout.to_tensors(analysis.sel(time=times)) for off, times in needed.items()}
    for off, f in states.items():
        bad = [i for i in range(len(init_times)) if not (torch.isfinite(f.upper[i]).all() and torch.isfinite(f.surface[i]).all())]
        if bad:
            raise BdlensError(f"the analysis at {_iso(needed[off][bad[0]])} holds NaN or inf values; repair the data or choose another --init")
    return states


def member_states(
    source: MemberSource, history: Mapping[int, Fields], init_key: int, members: Sequence[int], leads: Sequence[int],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, Fields]]:
    """(lead hours, member states (N, …)) for every output lead of one forecast, ascending.

    ``history``: offset hours → the init's analyses, one row (1, …); every member starts from them.
    """
    plan = tuple(plan_rollout(source.steps, leads, source.n_input_times == 2))
    n = len(members)
    source.start(Forecast(int(init_key), tuple(int(m) for m in members), plan))
    states = source.initial({off: Fields(*(x.to(device).expand(n, *x.shape[1:]) for x in f)) for off, f in history.items()})
    steps = {s: source.step for s in source.steps}
    yield from rollout(steps, states, leads, source.n_input_times == 2, with_call=True)


def forecast_members(
    source: MemberSource, layout: FieldLayout, analysis: xr.Dataset, init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int], members: int | None, coords: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """In-memory forecast of ``members`` members (None: one member and no ``number`` dim) at every init.

    Dims (number, time, prediction_timedelta, …) or (time, prediction_timedelta, …); physical units;
    ``coords`` (e.g. ``weight_sample``) are attached on ``number``.
    """
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    leads = sorted(int(h) for h in lead_hours)
    history = initial_states(analysis, layout, init_times, history_offsets(source))
    lead_coord = np.asarray(leads, dtype="timedelta64[h]").astype("timedelta64[ns]")
    ids = list(range(members or 1))
    per_init = []
    for i, t in enumerate(init_times):
        one = {off: Fields(*(x[i : i + 1] for x in f)) for off, f in history.items()}
        states = dict(member_states(source, one, streams.init_key(t), ids, leads))
        fields = Fields(*(torch.stack([getattr(states[lead], part) for lead in leads], 1).flatten(0, 1) for part in ("upper", "surface")))
        per_init.append(layout.from_tensors(fields, {"number": ids, "prediction_timedelta": lead_coord}).expand_dims(time=[t], axis=1))
    ds = xr.concat(per_init, dim="time")
    if members is None:
        return ds.isel(number=0, drop=True)
    return ds.assign_coords({name: ("number", np.asarray(values)) for name, values in (coords or {}).items()})


def deterministic_forecast(
    models: Mapping[int, TrainedModel], analysis: xr.Dataset, init_times: Sequence[np.datetime64] | np.ndarray,
    lead_hours: Sequence[int],
) -> xr.Dataset:
    """Forecast from ``analysis`` at ``init_times`` to ``lead_hours`` with deterministic step models
    (step hours → model, all on one layout). Dims (time, prediction_timedelta, [level,] latitude, longitude)."""
    if not models:
        raise BdlensError("no models given")
    first = next(iter(models.values()))
    for step, m in models.items():
        if m.step_hours != step or m.layout != first.layout:
            raise BdlensError(f"model for {step} h has step {m.step_hours} h or a different field layout than the others")
    return forecast_members(DeterministicMembers(models), first.layout, analysis, init_times, lead_hours, None)


def posterior_forecast(
    posteriors: Mapping[int, str | Path], layout: FieldLayout, analysis: xr.Dataset,
    init_times: Sequence[np.datetime64] | np.ndarray, lead_hours: Sequence[int], members: int, seed: int = 0,
) -> xr.Dataset:
    """K-member forecast from VI posteriors (step hours → posterior directory); member k uses weight
    sample k of each posterior (docs/ensemble.md) for its whole rollout. Dims (number, time, prediction_timedelta, …)."""
    models = {}
    for step, path in posteriors.items():
        bayes, manifest = load_posterior(path)
        if bayes.config.step_hours != step:
            raise BdlensError(f"posterior given for {step} h was trained for {bayes.config.step_hours} h")
        models[step] = posterior_model(bayes, layout, manifest, path)
    source = PosteriorMembers(models, Design(members, 1), seed)
    return forecast_members(source, layout, analysis, init_times, lead_hours, members)
