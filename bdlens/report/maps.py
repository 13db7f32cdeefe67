"""Uncertainty maps of an ensemble forecast and the matplotlib panel that shows them.

:func:`uncertainty_maps` splits the member spread at every point with the one-way random-effects
ANOVA of :func:`bdlens.uncertainty.decompose` (docs/science.md §6.2, ``docs/reports.md``): aleatoric
Â = mean_k s_k², epistemic Ê = s²(group means) − Â/J. Standard deviations need a non-negative
variance, so the maps clip Ê at 0 (and say so in the attributes) and define the total as
max(Ê, 0) + Â: then epistemic² + aleatoric² = total² at every point exactly, and where Ê ≥ 0 the
total is the unbiased Ê + Â, which relates to the plain variance s² of all N = KJ members by the
finite-sample identity (N − 1) s² = K(J − 1) Â + J(K − 1)(Ê + Â/J).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.evaluate import LEAD_DIM
from bdlens.report.figures import pretty_units
from bdlens.uncertainty import PERTURBATION_DRAW, WEIGHT_SAMPLE, decompose, has_design

#: The quantities of :func:`uncertainty_maps`, suffixes of its output variables ``VARIABLE_QUANTITY``.
QUANTITIES = ("mean", "total_std", "epistemic_std", "aleatoric_std", "epistemic_fraction")
LeadLike = int | float | np.timedelta64 | pd.Timedelta


def as_leads(leads: Sequence[LeadLike]) -> np.ndarray:
    """Leads as timedelta64[ns]: numbers are hours, timedeltas are kept."""
    values = [pd.Timedelta(lead, unit="h") if isinstance(lead, int | float | np.number) else pd.Timedelta(lead) for lead in leads]
    return np.asarray(values, dtype="timedelta64[ns]")


def select(
    da: xr.DataArray, levels: Sequence[float] | None = None, leads: Sequence[LeadLike] | None = None, name: str = "forecast"
) -> xr.DataArray:
    """``da`` restricted to ``levels`` (hPa, if it has levels) and ``leads`` (hours or timedeltas).

    Raises :class:`BdlensError` naming what is missing and what is there.
    """
    if levels is not None and "level" in da.dims:
        missing = sorted(set(levels) - set(da["level"].values.tolist()))
        if missing:
            raise BdlensError(f"{name} has no level(s) {missing} hPa (it has {da['level'].values.tolist()})")
        da = da.sel(level=list(levels))
    if leads is not None:
        if LEAD_DIM not in da.dims:
            raise BdlensError(f"{name} has no lead dimension {LEAD_DIM!r}; leave out leads")
        wanted = as_leads(leads)
        missing = wanted[~np.isin(wanted, da[LEAD_DIM].values)]
        if missing.size:
            have = (da[LEAD_DIM].values / np.timedelta64(1, "h")).astype(int).tolist()
            raise BdlensError(f"{name} has no lead(s) {(missing / np.timedelta64(1, 'h')).tolist()} h (it has {have} h)")
        da = da.sel({LEAD_DIM: wanted})
    return da


def _thresholds_for(thresholds: Mapping[str, Sequence[float]] | Sequence[float] | None, variable: str, n_variables: int) -> list[float]:
    if thresholds is None:
        return []
    if isinstance(thresholds, Mapping):
        return [float(t) for t in thresholds.get(variable, ())]
    if n_variables != 1:
        raise BdlensError("thresholds for several variables must be a mapping {variable: [values]} (units differ between variables)")
    return [float(t) for t in thresholds]


def uncertainty_maps(
    forecast: xr.Dataset | xr.DataArray,
    variables: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    leads: Sequence[LeadLike] | None = None,
    thresholds: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    member_dim: str = "number",
    split: bool = True,
) -> xr.Dataset:
    """Per-point uncertainty maps of an ensemble forecast, lazy on dask-backed input.

    ``forecast``: dims (``member_dim``, time, prediction_timedelta, [level,] latitude, longitude), the
    members carrying ``weight_sample`` / ``perturbation_draw`` coordinates (a K × J design, K, J ≥ 2;
    the bdlens forecast store writes them). ``variables`` (default: all), ``levels`` (hPa) and
    ``leads`` (hours or timedeltas) select what is mapped. ``thresholds``: {variable: [values]} in the
    variable's units (a plain list when one variable is mapped).

    Returns, for each variable V, in V's units unless noted: ``V_mean``; ``V_total_std``,
    ``V_epistemic_std``, ``V_aleatoric_std`` (see the module docstring: Ê clipped at 0, so
    epistemic² + aleatoric² = total² exactly); ``V_epistemic_fraction`` = max(Ê, 0)/total² (1, NaN
    where the total is 0); ``V_exceedance_probability`` (1) along dim ``V_threshold``: the member
    fraction above each threshold. ``split=False`` skips the decomposition (no design needed) and
    gives the member standard deviation (ddof 1) as ``V_total_std``. Raises :class:`BdlensError`
    when the split is asked for and the design coordinates are missing.
    """
    data = forecast.to_dataset(name=forecast.name or "forecast") if isinstance(forecast, xr.DataArray) else forecast
    names = list(variables) if variables is not None else [str(v) for v in data.data_vars]
    missing = [v for v in names if v not in data.data_vars]
    if missing:
        raise BdlensError(f"forecast has no variable(s) {', '.join(missing)} (it has {', '.join(map(str, data.data_vars))})")
    if member_dim not in data.dims or data.sizes[member_dim] < 2:
        raise BdlensError(f"uncertainty maps need an ensemble: at least 2 members along {member_dim!r} (dims {tuple(data.dims)})")
    if split and not has_design(data, member_dim):
        raise BdlensError(
            f"the forecast's members lack the {WEIGHT_SAMPLE!r} / {PERTURBATION_DRAW!r} coordinates needed to split epistemic from "
            "aleatoric spread (bdlens ensembles write them); pass split=False for the total spread only"
        )
    out = xr.Dataset(attrs={**data.attrs, "uncertainty_maps": __doc__.split("\n\n")[1].replace("\n", " ")})
    for name in names:
        # float64: float32 members (the stores' dtype) would leave the variance split exact only to ~1e-7.
        da = select(data[name], levels, leads, name=f"forecast variable {name}").astype(np.float64)
        units = da.attrs.get("units", "")
        members = da.sizes[member_dim]
        out[f"{name}_mean"] = da.mean(member_dim, skipna=False).assign_attrs(units=units, long_name=f"ensemble mean of {name}")
        if split:
            parts = decompose(da, member_dim)
            epistemic = parts["epistemic"].clip(min=0.0)
            total = epistemic + parts["aleatoric"]
            clipped = "the ANOVA epistemic variance clipped at 0 where negative (small samples)"
            design = {"weight_samples": parts.attrs["weight_samples"], "perturbation_draws": parts.attrs["perturbation_draws"]}
            out[f"{name}_total_std"] = np.sqrt(total).assign_attrs(
                units=units, long_name=f"total standard deviation of {name}", definition=f"sqrt(epistemic + aleatoric variance), {clipped}", **design
            )
            out[f"{name}_epistemic_std"] = np.sqrt(epistemic).assign_attrs(
                units=units, long_name=f"epistemic standard deviation of {name}", definition=f"sqrt of {clipped}", **design
            )
            out[f"{name}_aleatoric_std"] = np.sqrt(parts["aleatoric"]).assign_attrs(
                units=units, long_name=f"aleatoric standard deviation of {name}", definition="sqrt of mean_k s_k^2 (ddof 1)", **design
            )
            out[f"{name}_epistemic_fraction"] = (epistemic / total.where(total > 0)).assign_attrs(
                units="1", long_name=f"epistemic share of the variance of {name}", **design
            )
        else:
            out[f"{name}_total_std"] = da.std(member_dim, ddof=1, skipna=False).assign_attrs(
                units=units, long_name=f"total standard deviation of {name}", definition="member standard deviation, ddof 1", members=members
            )
        values = _thresholds_for(thresholds, name, len(names))
        if values:
            level = xr.DataArray(values, dims=(f"{name}_threshold",), coords={f"{name}_threshold": values}, attrs={"units": units})
            valid = da.notnull().all(member_dim)
            out[f"{name}_exceedance_probability"] = (
                (da > level).sum(member_dim).where(valid) / members
            ).assign_attrs(units="1", long_name=f"probability that {name} exceeds the threshold (member fraction)", members=members)
    return out.drop_vars("valid_time", errors="ignore")


def real_earth(ds: xr.Dataset | xr.DataArray) -> bool:
    """False for the demo world (its stores say Held-Suarez or carry a world key), True otherwise."""
    text = " ".join(str(ds.attrs.get(key, "")) for key in ("title", "source"))
    return "Held-Suarez" not in text and "bdlens_world_key" not in ds.attrs


def _axes(fig, n: int, coastlines: bool) -> tuple[np.ndarray, dict]:  # noqa: ANN001 - a matplotlib Figure
    """``n`` map axes in a row and the keywords that place data on them (a projection with coastlines)."""
    if not coastlines:
        return np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True)), {}
    import cartopy.crs as ccrs

    return np.atleast_1d(fig.subplots(1, n, subplot_kw={"projection": ccrs.PlateCarree()})), {"transform": ccrs.PlateCarree()}


def plot_uncertainty(
    maps: xr.Dataset,
    variable: str,
    level: float | None = None,
    lead: LeadLike | None = None,
    time: int | np.datetime64 | None = None,
    coastlines: bool | None = None,
):  # noqa: ANN201 - returns a matplotlib Figure, imported lazily
    """A row of maps of :func:`uncertainty_maps` output: mean, total, epistemic and aleatoric spread.

    ``level`` (hPa; default the first), ``lead`` (hours or timedelta; default the last) and ``time``
    (init index or datetime; default the first) pick the field. The three spreads share one colour
    bar (same units and scale), the mean has its own; both are labelled with units. With
    ``coastlines`` (default: when cartopy is installed and :func:`real_earth`) the maps are drawn on
    a PlateCarree projection with coastlines, otherwise on plain latitude/longitude axes. Returns a
    ``savefig``-ready matplotlib Figure.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    if f"{variable}_mean" not in maps:
        raise BdlensError(f"the maps have no variable {variable!r}; make them with uncertainty_maps(..., variables=[{variable!r}])")
    fields = {q: maps[f"{variable}_{q}"] for q in QUANTITIES[:4] if f"{variable}_{q}" in maps}

    def pick(da: xr.DataArray) -> xr.DataArray:
        if "level" in da.dims:
            da = da.sel(level=level) if level is not None else da.isel(level=0)
        if LEAD_DIM in da.dims:
            da = da.sel({LEAD_DIM: as_leads([lead])[0]}) if lead is not None else da.isel({LEAD_DIM: -1})
        if "time" in da.dims:
            da = da.isel(time=time or 0) if time is None or isinstance(time, int | np.integer) else da.sel(time=time)
        return da.load()

    fields = {q: pick(da) for q, da in fields.items()}
    mean = fields["mean"]
    if coastlines is None:
        try:
            import cartopy  # noqa: F401
        except ImportError:
            coastlines = False
        else:
            coastlines = real_earth(maps)
    units = pretty_units(mean.attrs.get("units", ""))
    fig = Figure(figsize=(3.9 * len(fields), 3.3), layout="constrained")
    axes, placement = _axes(fig, len(fields), coastlines)
    lon, lat = mean["longitude"].values, mean["latitude"].values
    spreads = [fields[q] for q in QUANTITIES[1:4] if q in fields]
    vmax = max(float(np.nanmax(s.values)) for s in spreads) if spreads else None
    titles = {"mean": "ensemble mean", "total_std": "total σ", "epistemic_std": "epistemic σ", "aleatoric_std": "aleatoric σ"}
    images = {}
    for ax, (q, da) in zip(axes, fields.items(), strict=True):
        style = {"cmap": "viridis"} if q == "mean" else {"cmap": "magma", "vmin": 0.0, "vmax": vmax}
        images[q] = ax.pcolormesh(lon, lat, da.values, shading="nearest", **style, **placement)
        ax.set_title(titles[q])
        if coastlines:
            ax.coastlines(linewidth=0.6)
        else:
            ax.set_aspect("equal")
            ax.set_xlabel("longitude (°E)")
    fig.colorbar(images["mean"], ax=axes[0], orientation="horizontal", label=f"{variable} ({units})")
    if not coastlines:
        axes[0].set_ylabel("latitude (°N)")
    if spreads:
        fig.colorbar(images["total_std"], ax=list(axes[1:]), orientation="horizontal", label=f"standard deviation ({units})", aspect=40)
    where = f" {int(mean['level'])} hPa" if "level" in mean.coords and mean["level"].ndim == 0 else ""
    when = []
    if "time" in mean.coords:
        when.append(f"init {np.datetime_as_string(mean['time'].values, unit='h')}")
    if LEAD_DIM in mean.coords:
        when.append(f"+{int(mean[LEAD_DIM].values / np.timedelta64(1, 'h'))} h")
    fig.suptitle(f"{variable}{where}, {', '.join(when)}" if when else f"{variable}{where}")
    return fig
