"""Validation scores of an ensemble stepper per lead, shared by the VI and perturbation trainers and calibration.

Hand-written rather than built on :mod:`bdlens.metrics` because it runs inside the training loop on
torch tensors in normalised units, a few forecasts at a time, without going through xarray; the
CRPS estimator is the same (:func:`fair_crps`, tested against :func:`bdlens.metrics.crps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import Dataset

from bdlens.devices import to_device
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.training.batches import collate_states, collate_targets, lead_targets


class ValidationSettings(BaseModel):
    """K members per validation forecast, the leads (in model steps), how many forecasts, their seed
    and how many forecasts run at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: int = Field(default=8, gt=1)
    leads: tuple[int, ...] = (1,)
    max_forecasts: int = Field(default=16, gt=0)
    seed: int = 12345
    batch_size: int = Field(default=4, gt=0)


def fair_crps(ensemble: Tensor, truth: Tensor) -> Tensor:
    """Pointwise fair CRPS with the members on dim 0: ensemble (M, ...), truth (...) → (...), M ≥ 2.

    mean_i|x_i − y| − Σ_i (2i − M − 1) x_(i) / (M(M − 1)) with the members sorted (docs/science.md §7), the
    same estimator as :func:`bdlens.metrics.crps`; differentiable (through ``torch.sort``'s values).
    """
    m = ensemble.shape[0]
    if m < 2:
        raise BdlensError(f"the fair CRPS needs at least 2 members, got {m}")
    skill = (ensemble - truth).abs().mean(0)
    coef = 2.0 * torch.arange(1, m + 1, dtype=ensemble.dtype, device=ensemble.device) - m - 1.0
    ordered = torch.sort(ensemble, dim=0).values
    spread = torch.tensordot(coef, ordered, dims=([0], [0]))
    return skill - spread / (m * (m - 1))


def channel_std(dataset: Dataset) -> np.ndarray | None:
    """Per channel (model order), the standard deviation that turns normalised units into physical ones."""
    layout, stats = getattr(dataset, "layout", None), getattr(dataset, "stats", None)
    if layout is None or stats is None:
        return None
    norm = layout.norm_tensors(stats, dtype=torch.float64)
    return torch.cat([norm.upper_std.flatten(), norm.surface_std.flatten()]).numpy()


@torch.no_grad()
def ensemble_scores(
    ensemble: Any,
    dataset: Dataset,
    leads: Sequence[int],
    max_forecasts: int,
    batch_size: int = 8,
    latitude: np.ndarray | None = None,
    per_variable: bool = False,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Per lead (model steps): fair CRPS, ensemble-mean RMSE, spread and corrected spread-skill ratio.

    ``ensemble`` is the stepper (``.step(previous, current)`` → (K, B, …) states, ``.size`` = K);
    up to ``max_forecasts`` evenly spread forecasts from ``dataset`` run ``batch_size`` at a time.
    A stochastic stepper's ``start(keys)`` gets the forecasts' sample indices before each batch, so
    every forecast has its own noise whatever the batch size (the scores do not depend on it). Normalised units, all upper-air and surface
    channels alike, latitude-weighted (cell areas of ``latitude``, default the dataset's grid):
    crps = mean w·CRPS_fair, rmse = √(mean w (x̄ − y)²), spread = √(mean w s²) (s² with ddof 1),
    spread_skill = spread/rmse·√((K+1)/K). Each record also holds the ``mse`` and ``variance`` the
    means come from. With ``per_variable`` (needs the dataset's layout and stats) the record adds
    ``rmse_<var>_<level>`` and ``spread_<var>_<level>`` (and surface ``rmse_<var>``, ``spread_<var>``)
    in physical units. The states go to ``device``, the ensemble's.
    """
    leads = sorted(set(int(lead) for lead in leads))
    weights = torch.as_tensor(lat_weights(latitude if latitude is not None else dataset.layout.grid.latitudes()), dtype=torch.float32,
                              device=device)[:, None]
    std = channel_std(dataset) if per_variable else None
    if per_variable and std is None:
        raise BdlensError("per-variable validation needs a dataset with a field layout and normalisation stats (a WeatherDataset)")
    plan = lead_targets(dataset, tuple(leads), max_forecasts)
    sums: dict[int, Tensor] = {}
    size = ensemble.size
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        if hasattr(ensemble, "start"):
            ensemble.start([i for i, _ in chunk])
        previous, current = to_device(collate_states(dataset, [i for i, _ in chunk]), torch.device(device))
        for lead in range(1, leads[-1] + 1):
            previous, current = current, ensemble.step(previous, current)
            if lead in leads:
                truth = to_device(collate_targets(dataset, [later[leads.index(lead)] for _, later in chunk]), torch.device(device))
                forecast = torch.cat([current[0].flatten(2, 3), current[1]], dim=2)  # (K, B, C, H, W)
                target = torch.cat([truth[0].flatten(1, 2), truth[1]], dim=1)
                per_channel = torch.stack([  # (3, C): sums over forecasts, means over grid points
                    (fair_crps(forecast, target) * weights).mean(dim=(-1, -2)).sum(0),
                    ((forecast.mean(0) - target).square() * weights).mean(dim=(-1, -2)).sum(0),
                    (forecast.var(0, correction=1) * weights).mean(dim=(-1, -2)).sum(0),
                ]).double()
                sums[lead] = sums.get(lead, 0) + per_channel
    n = len(plan)
    records = []
    for lead in leads:
        channel_means = sums[lead] / n  # (3, C)
        crps, mse, var = (float(v) for v in channel_means.mean(1))
        record: dict[str, Any] = {
            "lead_steps": lead, "crps": crps, "rmse": math.sqrt(mse), "spread": math.sqrt(var),
            "spread_skill": math.sqrt(var / mse * (size + 1) / size) if mse > 0 else math.nan,
            "forecasts": n, "members": size, "mse": mse, "variance": var,
        }
        if per_variable:
            for c, name in enumerate(dataset.layout.channel_names):
                record[f"rmse_{name}"] = float(channel_means[1, c].sqrt()) * float(std[c])
                record[f"spread_{name}"] = float(channel_means[2, c].sqrt()) * float(std[c])
        records.append(record)
    return records


def reported(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`ensemble_scores` records as the trainers log them (without the ``mse`` and ``variance`` they are computed from)."""
    return [{k: v for k, v in row.items() if k not in ("mse", "variance")} for row in rows]
