"""Deterministic forecasts with hierarchical temporal aggregation, Dataset in, Dataset out.

The models (one per step Δ) are composed with :func:`bdlens.models.lead_time.rollout`; states
travel between models in physical units, each model normalising with its own statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from bdlens.data import Fields
from bdlens.errors import BdlensError
from bdlens.models.lead_time import rollout
from bdlens.models.pretrained import TrainedModel
from bdlens.progress import bar


def _history(model_steps: Sequence[int], two_times: bool) -> list[int]:
    return [0] + ([-s for s in sorted(set(model_steps))] if two_times else [])


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
    layout = first.layout
    two_times = first.model.config.n_input_times == 2
    for step, m in models.items():
        if m.step_hours != step or m.layout != layout:
            raise BdlensError(f"model for {step} h has step {m.step_hours} h or a different field layout than the others")
    offsets = _history(list(models), two_times)
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    needed = np.unique((init_times[:, None] + np.asarray(offsets, dtype="timedelta64[h]")[None, :]).ravel())
    missing = np.setdiff1d(needed, analysis.time.values)
    if missing.size:
        raise BdlensError(f"the analysis lacks {missing.size} time(s) the forecast needs, e.g. {np.datetime_as_string(missing[0], unit='h')}")
    leads = sorted(int(h) for h in lead_hours)
    steppers = {s: m.step for s, m in models.items()}
    chunks = []
    with bar(total=len(init_times), desc="forecast", unit="init") as progress:
        for start in range(0, len(init_times), batch_size):
            batch = init_times[start : start + batch_size]
            history = {
                off: layout.to_tensors(analysis.sel(time=batch + np.timedelta64(off, "h"))) for off in offsets
            }
            per_lead = {lead: state for lead, state in rollout(steppers, history, leads, two_times)}
            upper = torch.stack([per_lead[lead].upper for lead in leads], 1)  # (B, L, V, Z, H, W)
            surface = torch.stack([per_lead[lead].surface for lead in leads], 1)
            fields = Fields(upper.reshape(-1, *upper.shape[2:]), surface.reshape(-1, *surface.shape[2:]))
            coords = {"time": batch, "prediction_timedelta": np.asarray(leads, dtype="timedelta64[h]").astype("timedelta64[ns]")}
            chunks.append(layout.from_tensors(fields, coords))
            progress.update(len(batch))
    return xr.concat(chunks, dim="time")
