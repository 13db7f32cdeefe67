"""The evaluation engine behind ``bdlens evaluate``: every metric of docs/science.md §7 per variable, level and lead.

Forecasts (dims ``number, time, prediction_timedelta, [level,] latitude, longitude``; ``time`` is the
initialisation) are matched to the truth at valid time = time + prediction_timedelta. Init/lead
pairs whose valid time the truth lacks are NaN and drop out of the averages (the reduction policy of
:mod:`bdlens.metrics.weighting`). All scalar metrics are averaged over initialisation time and space
(cell-area weighted) and kept per lead and level. Everything stays lazy (dask) until one compute per
forecast and variable, so forecasts larger than memory stream through chunk by chunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from bdlens.data.reader import format_times, reading
from bdlens.errors import BdlensError
from bdlens.metrics import registry
from bdlens.outputs import check_output_file, partial_path
from bdlens.progress import bar

log = logging.getLogger(__name__)

#: Averaged over these (init) time and space dims; every metric is kept per lead and level.
REDUCE_DIMS: tuple[str, ...] = ("time", "latitude", "longitude")
LEAD_DIM = "prediction_timedelta"
DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)
#: Forecast bytes per dask chunk: a few large chunks keep the task graph (and a distributed
#: scheduler's per-task overhead) small, while the O(M) intermediates per chunk stay a few times this.
TARGET_CHUNK_BYTES = 16 * 2**20
_BIN_DIMS: tuple[str, ...] = ("quantile", "probability_bin", "rank", "zonal_wavenumber")
TABLE_COLUMNS: tuple[str, ...] = ("forecast", "variable", "level", "lead_hours", "metric", "bin", "value")

def open_data(path: str | Path, member_dim: str = "number") -> xr.Dataset:
    """Open a forecast or truth store lazily in the canonical layout (:func:`bdlens.data.open_dataset`),
    its member dimension ``member_dim`` renamed to ``number``."""
    from bdlens.data import open_dataset

    return open_dataset(path, member_dim=member_dim)


def align_truth(forecast: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """The truth at each forecast's valid time, dims like the forecast without the member dim.

    Returns NaN where the truth lacks the valid time; the valid times are kept as coordinate
    ``valid_time`` (time, prediction_timedelta). Lazy on dask: one reindex per lead.
    """
    if LEAD_DIM not in forecast.dims:
        return truth.reindex(time=forecast["time"].values)
    inits = forecast["time"].values
    pieces = [
        truth.reindex(time=inits + lead).assign_coords(time=inits, valid_time=("time", inits + lead))
        for lead in forecast[LEAD_DIM].values
    ]
    return xr.concat(pieces, dim=forecast[LEAD_DIM], coords="different", compat="equals")


def valid_times(forecast: xr.Dataset | xr.DataArray) -> np.ndarray:
    """Valid times, shape (init time, lead): time + prediction_timedelta (one column without leads)."""
    leads = forecast[LEAD_DIM].values if LEAD_DIM in forecast.dims else np.array([np.timedelta64(0, "ns")])
    return forecast["time"].values[:, None] + leads[None, :]


def check_inputs(
    name: str, forecast: xr.Dataset, truth: xr.Dataset, member_dim: str, variables: Sequence[str], deterministic: bool = False
) -> None:
    """Raise :class:`BdlensError` for the bad inputs that would make the scores meaningless.

    ``deterministic`` accepts forecasts without (or with one) member, scored as deterministic.
    """
    if member_dim not in forecast.dims and not deterministic:
        raise BdlensError(
            f"forecast {name}: no member dimension {member_dim!r} (dims {tuple(forecast.dims)}); "
            "pass its name with --member-dim, or score a deterministic forecast with `bdlens report`"
        )
    if not deterministic and forecast.sizes[member_dim] < 2:
        raise BdlensError(f"forecast {name}: only one member along {member_dim!r}; ensemble metrics need at least 2")
    missing = [v for v in variables if v not in truth.data_vars]
    if missing:
        raise BdlensError(f"truth lacks variable(s) {', '.join(missing)} of forecast {name}; pass --variables to choose others")
    absent = [v for v in variables if v not in forecast.data_vars]
    if absent:
        raise BdlensError(f"forecast {name} lacks variable(s) {', '.join(absent)}; pass --variables to choose others")
    for coord in ("latitude", "longitude"):
        f, t = forecast[coord].values, truth[coord].values
        if f.shape != t.shape or not np.allclose(f, t):
            raise BdlensError(
                f"forecast {name} is on a {forecast.sizes['longitude']}x{forecast.sizes['latitude']} grid but the truth on "
                f"{truth.sizes['longitude']}x{truth.sizes['latitude']} ({coord} differs); regrid one of them"
            )
    if "level" in forecast.dims:
        truth_levels = set(truth["level"].values.tolist()) if "level" in truth.dims else set()
        missing_levels = sorted(set(forecast["level"].values.tolist()) - truth_levels)
        if missing_levels:
            raise BdlensError(f"truth lacks level(s) {missing_levels} hPa of forecast {name}; use a truth store with them")
    if not np.isin(valid_times(forecast), truth["time"].values).any():
        raise BdlensError(
            f"forecast {name}: no valid time (init {format_times(forecast['time'].values.min(keepdims=True))}.."
            f"{format_times(forecast['time'].values.max(keepdims=True))} plus leads) is in the truth "
            f"({format_times(truth['time'].values.min(keepdims=True))}..{format_times(truth['time'].values.max(keepdims=True))}); "
            "use overlapping periods"
        )


def _restrict_to_verifiable(forecast: xr.Dataset, truth_times: np.ndarray) -> xr.Dataset:
    """Drop initialisations none of whose valid times the truth has (they would only cost I/O)."""
    return forecast.isel(time=np.isin(valid_times(forecast), truth_times).any(axis=1))


def coarsen_chunks(forecast: xr.DataArray, member_dim: str, target_bytes: int = TARGET_CHUNK_BYTES) -> xr.DataArray:
    """Merge stored chunks up to about ``target_bytes``, members in one chunk.

    When one init (all members, leads, levels, the whole grid) fits, chunks hold whole inits, as many
    as fit: a store written in small chunks would otherwise cost a task-graph overhead many times
    its compute. Otherwise the stored chunks are kept and only merged along init time.
    """
    if not forecast.chunks:
        return forecast
    per_init = forecast.nbytes / forecast.sizes["time"]
    if per_init <= target_bytes:
        whole = {d: -1 for d in forecast.dims if d != "time"}
        return forecast.chunk({**whole, "time": min(forecast.sizes["time"], int(target_bytes // per_init))})
    forecast = forecast.chunk({member_dim: -1})
    largest = {dim: max(sizes) for dim, sizes in zip(forecast.dims, forecast.chunks, strict=True)}
    chunk_bytes = int(np.prod(list(largest.values()))) * forecast.dtype.itemsize
    factor = max(1, target_bytes // chunk_bytes)
    return forecast.chunk({"time": min(forecast.sizes["time"], largest["time"] * factor)})


def variable_metrics(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    climatology: xr.DataArray | None,
    thresholds: xr.DataArray | None,
    member_dim: str = "number",
    seed: int = 0,
    metrics: Sequence[registry.Metric] | None = None,
) -> xr.Dataset:
    """The registry's metrics of one variable, lazily: ``scores`` (metric, lead, [level]) plus the diagnostics.

    ``truth`` is already aligned (see :func:`align_truth`); ``thresholds`` has a ``quantile`` dim.
    ``metrics`` defaults to the scores and diagnostics of :mod:`bdlens.metrics.registry`; those the
    forecast cannot support (too few members, no weight-sample design) are left out.
    """
    dims = tuple(d for d in REDUCE_DIMS if d in forecast.dims)
    inputs = registry.Inputs(forecast, truth, member_dim, dims, climatology, thresholds, seed)
    chosen = registry.select() if metrics is None else metrics
    values = registry.compute([m for m in chosen if m.kind == "score"], inputs)
    out = xr.Dataset(registry.compute([m for m in chosen if m.kind != "score"], inputs))
    if values:
        # object dtype: forecasts with different metric sets join on it (pandas string indexes do not)
        out["scores"] = xr.concat(list(values.values()), dim=pd.Index(list(values), name="metric", dtype=object), coords="minimal")
    return out.drop_vars(["forecast_probability", "valid_time"], errors="ignore")


def evaluate(
    forecasts: Mapping[str, xr.Dataset],
    truth: xr.Dataset,
    member_dim: str = "number",
    variables: Sequence[str] | None = None,
    climatology: xr.Dataset | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    deterministic: bool = False,
) -> xr.Dataset:
    """Score each named forecast against the truth; returns the computed metrics Dataset.

    Output variables, for each forecast variable V: ``V`` (forecast, metric, prediction_timedelta,
    [level]) with the scores of :mod:`bdlens.metrics.registry` (``brier_q*``/``fair_brier_q*`` at
    the climatological quantiles); ``V_rank_histogram`` (…, rank); ``V_reliability_*`` (…, quantile,
    probability_bin); ``V_spectrum_forecast`` / ``V_spectrum_truth`` (…, zonal_wavenumber); with
    ``metrics`` naming checks, ``V_calibration_ratio`` and the like. ``metrics``: registry names
    (default: every score and diagnostic). ``climatology`` defaults to the truth's time mean (right
    for the seasonless demo world); Brier thresholds are per-point quantiles of the truth over its
    whole period. ``deterministic``: a forecast without member dim is scored as one member (the
    metrics that need M ≥ 2 are NaN for it).
    """
    if not forecasts:
        raise BdlensError("no forecasts to evaluate; pass at least one forecast store")
    quantiles = tuple(float(q) for q in quantiles)
    if not all(0.0 < q < 1.0 for q in quantiles):
        raise BdlensError(f"quantiles must lie strictly between 0 and 1, got {quantiles}")
    jobs = []
    for name, forecast in forecasts.items():
        names = list(variables) if variables else [str(v) for v in forecast.data_vars]
        check_inputs(name, forecast, truth, member_dim, names, deterministic)
        jobs.extend((name, variable) for variable in names)
    chosen = registry.select(metrics)
    results: dict[str, dict[str, xr.Dataset]] = {}
    for name, variable in bar(jobs, desc="evaluate", unit="field"):
        forecast = _restrict_to_verifiable(forecasts[name], truth["time"].values)[variable]
        if member_dim not in forecast.dims:
            forecast = forecast.expand_dims({member_dim: 1})
        forecast = coarsen_chunks(forecast, member_dim)
        observed = truth[variable]
        if "level" in forecast.dims:
            observed = observed.sel(level=forecast["level"].values)
        clim = (climatology[variable] if climatology is not None else observed.mean("time")).astype(np.float64)
        series = observed.chunk({"time": -1, "latitude": "auto", "longitude": "auto"}) if observed.chunks else observed
        thresholds = series.quantile(list(quantiles), dim="time")
        aligned = align_truth(forecast, observed)
        if forecast.chunks:
            # Chunked like the forecast once, so no metric needs its own rechunk of the truth.
            aligned = aligned.chunk({d: c for d, c in zip(forecast.dims, forecast.chunks, strict=True) if d in aligned.dims})
        log.info("evaluating %s / %s (%s members)", name, variable, forecast.sizes[member_dim])
        # Computed in the same pass as the metrics: NaN points drop out of the averages, so a member or
        # a field that is NaN everywhere would otherwise only leave a quietly different score.
        empty = xr.Dataset({"member": forecast.isnull().all([d for d in forecast.dims if d != member_dim]), "truth": aligned.isnull().all()})
        with reading(f"forecast {name} or the truth, variable {variable}"):
            # Two computes, not one dask.compute of both: the metric graphs and this one share inputs that
            # dask's graph merge drops ("Missing dependency"), seen with the report's metric set.
            scores = variable_metrics(forecast, aligned, clim, thresholds, member_dim, seed, chosen).compute()
            empty = empty.compute()
        _refuse_empty(name, variable, empty, member_dim)
        results.setdefault(variable, {})[name] = scores
    return _assemble(results, quantiles, climatology is not None)


def _refuse_empty(name: str, variable: str, empty: xr.Dataset, member_dim: str) -> None:
    """Raise :class:`BdlensError` when members of forecast ``name`` or the truth are NaN everywhere."""
    if bool(empty["truth"]):
        raise BdlensError(f"the truth's {variable} is NaN at every valid time of forecast {name}; fix the truth store or leave out {variable}")
    nan_members = empty[member_dim].values[empty["member"].values]
    if nan_members.size == empty["member"].size:
        raise BdlensError(f"forecast {name}: {variable} is NaN everywhere; fix the store or leave it out with --variables")
    if nan_members.size:
        raise BdlensError(
            f"forecast {name}: member(s) {', '.join(map(str, nan_members.tolist()))} along {member_dim!r} are NaN everywhere in {variable}; "
            "drop them or fix the store"
        )


def _assemble(results: dict[str, dict[str, xr.Dataset]], quantiles: Sequence[float], given_climatology: bool) -> xr.Dataset:
    """Concatenate per-forecast results along ``forecast`` and flatten to one variable per diagnostic."""
    out = xr.Dataset()
    for variable, per_forecast in results.items():
        combined = xr.concat(list(per_forecast.values()), dim=pd.Index(list(per_forecast), name="forecast"), join="outer")
        if "scores" in combined:
            out[variable] = combined["scores"].assign_attrs(variable=variable, diagnostic="scores")
        for diagnostic in combined.data_vars:
            if diagnostic != "scores":
                out[f"{variable}_{diagnostic}"] = combined[diagnostic].assign_attrs(variable=variable, diagnostic=diagnostic)
    if "metric" in out.dims:
        out = out.assign_coords(metric_description=("metric", [registry.description(m) for m in out["metric"].values.tolist()]))
    out.attrs.update(
        reduced_over="initialisation time, latitude (cell-area weighted), longitude; per lead and level; NaN points skipped",
        valid_time="truth taken at time + prediction_timedelta; init/lead pairs without truth are left out",
        climatology="given by the user" if given_climatology else "time mean of the truth",
        brier_thresholds=f"per-point quantiles {list(quantiles)} of the truth over its whole period; event value > threshold",
        rank_histogram="M+1 bins, cell-area weighted frequencies, ties broken at random (seeded)",
    )
    return out


def to_table(result: xr.Dataset) -> pd.DataFrame:
    """The result as one long table: forecast, variable, level, lead_hours, metric, bin, value.

    Scalar metrics have an empty ``bin``; diagnostics put their extra coordinates there (e.g. the
    rank, or "quantile/probability_bin").
    """
    frames = []
    for da in result.data_vars.values():
        frame = da.drop_vars([c for c in da.coords if c not in da.dims]).to_dataframe(name="value").reset_index()
        frame["variable"] = da.attrs["variable"]
        if "metric" not in frame:
            frame["metric"] = da.attrs["diagnostic"]
        bin_dims = [d for d in da.dims if d in _BIN_DIMS]
        frame["bin"] = frame[bin_dims].astype(str).agg("/".join, axis=1) if bin_dims else ""
        frames.append(frame.drop(columns=bin_dims))
    table = pd.concat(frames, ignore_index=True)
    table["lead_hours"] = table.pop(LEAD_DIM) / pd.Timedelta(hours=1) if LEAD_DIM in table else np.nan
    if "level" not in table:
        table["level"] = np.nan
    return table[list(TABLE_COLUMNS)]


def write(result: xr.Dataset, path: str | Path, overwrite: bool = False) -> Path:
    """Write to ``.nc`` or ``.csv`` atomically: a partial file in the same folder, then a rename."""
    path = Path(path)
    check_output_path(path, overwrite)
    tmp = partial_path(path)
    try:
        if path.suffix == ".nc":
            result.to_netcdf(tmp)
        else:
            to_table(result).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_metrics_file(path: Path) -> bool:
    """Whether ``path`` is a metrics file that :func:`write` wrote (netCDF with its attributes, or
    CSV with its header), i.e. one that ``--overwrite`` may replace."""
    try:
        if path.suffix == ".nc":
            with xr.open_dataset(path) as ds:
                return {"reduced_over", "valid_time", "brier_thresholds"} <= set(ds.attrs)
        with path.open() as fh:
            return fh.readline().strip() == ",".join(TABLE_COLUMNS)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_output_path(path: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> None:
    """Fail early for an output we could not or should not write: a wrong suffix, one of the
    ``inputs``, a directory, a missing folder, or an existing file without ``overwrite`` or not
    written by bdlens (:func:`bdlens.outputs.check_output_file`)."""
    path = Path(path)
    if path.suffix not in (".nc", ".csv"):
        raise BdlensError(f"output {path} must end in .nc (netCDF) or .csv (long table)")
    check_output_file(path, overwrite, is_metrics_file, inputs, what="metrics file")
