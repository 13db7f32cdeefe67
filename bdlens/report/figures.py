"""Figures of the evaluation report, drawn from the output of :func:`bdlens.evaluate.evaluate`.

Each function takes the evaluation result of one field (one variable, at one level if it has levels:
``result`` holds ``V`` (forecast, metric, prediction_timedelta) and the diagnostics ``V_*``) and
returns a ``savefig``-ready matplotlib Figure (no pyplot: no global state, no GUI backend). Every
system keeps its colour across figures (:func:`colours`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bdlens.evaluate import LEAD_DIM

_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def pretty_units(units: str) -> str:
    """CF unit strings with exponents as superscripts: ``m2 s-2`` → ``m² s⁻²``."""
    return re.sub(r"(?<=[A-Za-z])(-?\d+)", lambda m: m.group(1).translate(_SUPERSCRIPTS), units)


def colours(systems: Sequence[str]) -> dict[str, Any]:
    """One colour per system, in the given order: tab10 up to 10 systems, else tab20 (distinct up to 20)."""
    if len(systems) <= 10:
        return {name: f"C{i}" for i, name in enumerate(systems)}
    palette = matplotlib.colormaps["tab20"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(systems)}


def lead_hours(da: xr.DataArray) -> np.ndarray:
    """The lead coordinate in hours (float)."""
    return da[LEAD_DIM].values / np.timedelta64(1, "h")


def _figure(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n))


def _score(result: xr.Dataset, variable: str, name: str, metric: str) -> xr.DataArray | None:
    """The score along lead for one system, or None when it was not computed or is all NaN."""
    if metric not in result["metric"].values:
        return None
    values = result[variable].sel(forecast=name, metric=metric)
    return None if bool(values.isnull().all()) else values


def skill_vs_lead(result: xr.Dataset, variable: str, title: str, units: str, members: Mapping[str, int]) -> Figure:
    """CRPS, ensemble-mean RMSE and corrected spread-skill vs lead, every system on each panel.

    A deterministic system (one member) has no fair CRPS; its standard CRPS, which is its mean
    absolute error, is drawn dashed instead.
    """
    fig, axes = _figure(3)
    colour = colours(list(members))
    panels = (("crps", f"fair CRPS ({units})"), ("rmse", f"ensemble-mean RMSE ({units})"), ("spread_skill_corrected", "spread-skill (corrected)"))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for name, m in members.items():
            values, style, suffix = _score(result, variable, name, metric), "-", ""
            if metric == "crps" and m == 1:
                values, style, suffix = _score(result, variable, name, "crps_standard"), "--", " (CRPS = MAE)"
            if values is not None:
                ax.plot(lead_hours(values), values.values, style, marker="o", ms=3, color=colour[name], label=name + suffix)
        if metric == "spread_skill_corrected":
            ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_xlabel("lead (h)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # One legend beside the panels: inside one it hides curves once a dozen systems are compared.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    return fig


def rank_histograms(result: xr.Dataset, variable: str, title: str, members: Mapping[str, int]) -> Figure | None:
    """One rank histogram per ensemble (all leads pooled), scaled so a flat histogram is 1."""
    ensembles = [name for name, m in members.items() if m > 1]
    if not ensembles:
        return None
    fig, axes = _figure(len(ensembles), width=3.4)
    colour = colours(list(members))
    for ax, name in zip(axes, ensembles, strict=True):
        hist = result[f"{variable}_rank_histogram"].sel(forecast=name).isel(rank=slice(0, members[name] + 1)).mean(LEAD_DIM)
        ax.bar(hist["rank"].values, hist.values * (members[name] + 1), color=colour[name], width=0.85)
        ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
        ax.set_title(f"{name} (M = {members[name]})", fontsize=10)
        ax.set_xlabel("rank of the truth")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("frequency × (M + 1)")
    fig.suptitle(title)
    return fig


def reliability_diagrams(result: xr.Dataset, variable: str, title: str, members: Mapping[str, int]) -> Figure:
    """Observed frequency vs forecast probability of "value > climatological quantile", one panel per quantile.

    Leads are pooled, each bin weighted by its share of cases.
    """
    observed = result[f"{variable}_reliability_observed_frequency"]
    share = result[f"{variable}_reliability_bin_fraction"]
    quantiles = observed["quantile"].values
    fig, axes = _figure(len(quantiles), width=3.4, height=3.4)
    colour = colours(list(members))
    for ax, q in zip(axes, quantiles, strict=True):
        for name, m in members.items():
            frac = share.sel(forecast=name, quantile=q).isel(probability_bin=slice(0, m + 1))
            freq = observed.sel(forecast=name, quantile=q).isel(probability_bin=slice(0, m + 1))
            pooled = (freq * frac).sum(LEAD_DIM, min_count=1) / frac.where(freq.notnull()).sum(LEAD_DIM)
            ax.plot(np.arange(m + 1) / m if m > 0 else [0.0], pooled.values, marker="o", ms=3, color=colour[name], label=name)
        ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls=":")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="forecast probability", title=f"value > q{q:g} of the truth")
        ax.set_aspect("equal")
    axes[0].set_ylabel("observed frequency")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def spread_vs_error(result: xr.Dataset, variable: str, title: str, units: str, members: Mapping[str, int]) -> Figure | None:
    """Corrected spread, sqrt((M + 1)/M) × spread, vs ensemble-mean RMSE, one point per lead; calibrated on the diagonal."""
    ensembles = [name for name, m in members.items() if m > 1]
    if not ensembles:
        return None
    fig, axes = _figure(1, width=4.6, height=4.0)
    ax = axes[0]
    colour = colours(list(members))
    top = 0.0
    for name in ensembles:
        rmse, spread = _score(result, variable, name, "rmse"), _score(result, variable, name, "spread")
        if rmse is None or spread is None:
            continue
        corrected = spread.values * np.sqrt((members[name] + 1) / members[name])
        ax.plot(rmse.values, corrected, lw=0.8, alpha=0.5, color=colour[name])
        ax.scatter(rmse.values, corrected, s=14, color=colour[name], label=name, zorder=3)
        top = max(top, float(np.nanmax(rmse.values)), float(np.nanmax(corrected)))
    ax.plot([0, top * 1.05], [0, top * 1.05], color="0.4", lw=0.8, ls=":")
    ax.set(xlabel=f"ensemble-mean RMSE ({units})", ylabel=f"spread × sqrt((M+1)/M) ({units})", xlim=(0, top * 1.05), ylim=(0, top * 1.05))
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def spectra(result: xr.Dataset, variable: str, title: str, units: str, members: Mapping[str, int]) -> Figure:
    """Zonal power spectra of the members (mean) and of the truth at the longest lead every system has."""
    forecast = result[f"{variable}_spectrum_forecast"]
    truth = result[f"{variable}_spectrum_truth"]
    scored = forecast.notnull().any("zonal_wavenumber")
    common = scored.all("forecast")
    lead = forecast[LEAD_DIM].values[common.values][-1] if bool(common.any()) else forecast[LEAD_DIM].values[-1]
    fig, axes = _figure(1, width=5.0, height=3.8)
    ax = axes[0]
    colour = colours(list(members))
    k = forecast["zonal_wavenumber"].values[1:]
    reference = truth.sel({LEAD_DIM: lead}).mean("forecast").values[1:]
    for name in members:
        ax.loglog(k, forecast.sel(forecast=name, **{LEAD_DIM: lead}).values[1:], color=colour[name], lw=1.6, label=name)
    ax.loglog(k, reference, color="black", lw=1.4, ls="--", label="truth", zorder=5)  # on top: the reference
    ax.set(xlabel="zonal wavenumber", ylabel=f"power (({units})²)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}, +{lead / np.timedelta64(1, 'h'):g} h", fontsize=10)
    return fig


def epistemic_share(shares: Mapping[str, xr.DataArray], title: str) -> Figure:
    """Ê / (Ê + Â) of the area- and init-mean variances vs lead, one line per (system, field)."""
    fig, axes = _figure(1, width=5.2, height=3.6)
    ax = axes[0]
    for label, share in shares.items():
        ax.plot(lead_hours(share), share.values, marker="o", ms=3, label=label)
    ax.set(xlabel="lead (h)", ylabel="epistemic share of the variance", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig
