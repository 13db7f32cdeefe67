"""The per-lead summary ``bdlens ensemble`` prints: global means of the ensemble mean and spread, and
the epistemic / aleatoric shares of the variance, for Z500 and T850."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.ensemble.store import DECOMPOSITION, open_forecast
from bdlens.grid import lat_weights

FIELDS = (("Z500", "geopotential", 500), ("T850", "temperature", 850))


def _global_mean(field: xr.DataArray) -> xr.DataArray:
    weights = xr.DataArray(lat_weights(field.latitude.values), dims="latitude")
    return (field * weights).mean(("latitude", "longitude"))


def summary_table(path: str | Path) -> str:
    """A Markdown table, one row per lead (mean over inits): area-weighted global mean of the ensemble
    mean and of the spread (sqrt of the mean member variance), and each field's epistemic and
    aleatoric share of the total variance (when the store has a decomposition)."""
    path = Path(path)
    forecast = open_forecast(path)
    try:
        parts = xr.open_zarr(path, group=DECOMPOSITION, consolidated=True)
    except (FileNotFoundError, KeyError, OSError):
        parts = None
    header = ["lead"]
    columns = []
    for label, name, level in FIELDS:
        if name not in forecast or level not in forecast.level.values:
            continue
        field = forecast[name].sel(level=level)
        header += [f"{label} mean", f"{label} spread"]
        columns += [_global_mean(field.mean("number")).mean("time"), np.sqrt(_global_mean(field.var("number", ddof=1)).mean("time"))]
        if parts is not None:
            epi = _global_mean(parts[f"{name}_epistemic_variance"].sel(level=level)).mean("time")
            tot = _global_mean(parts[f"{name}_total_variance"].sel(level=level)).mean("time")
            header += [f"{label} epistemic %", f"{label} aleatoric %"]
            columns += [100 * epi / tot, 100 * (tot - epi) / tot]
    values = [c.compute().values for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, lead in enumerate(forecast.prediction_timedelta.values):
        hours = int(lead / np.timedelta64(1, "h"))
        lines.append("| " + " | ".join([f"{hours} h"] + [f"{v[i]:.4g}" for v in values]) + " |")
    return "\n".join(lines)
