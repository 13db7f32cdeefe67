"""The HTML evaluation report behind ``bdlens report`` (one self-contained page plus CSV tables).

:func:`write_report` checks every input first (grids, overlapping times, NaN-only fields, the output
directory), then scores each system with the metric registry through :func:`bdlens.evaluate.evaluate`
(dask reductions, one compute per system and variable), maps the uncertainty decomposition of the
systems that carry a K × J design, draws the figures (embedded as base64 PNG) and renders the jinja2
template ``templates/report.html.j2``. The report is assembled in a temporary sibling directory and
moved into place only when complete, so a failure leaves nothing half-written. What each section
shows and how to read it: ``docs/reports.md``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import xarray as xr

from bdlens import __version__
from bdlens.errors import BdlensError
from bdlens.evaluate import DEFAULT_QUANTILES, LEAD_DIM, check_inputs, evaluate, open_data, to_table
from bdlens.metrics import registry
from bdlens.outputs import mark_output, prepare_output
from bdlens.progress import bar
from bdlens.report import figures
from bdlens.report.maps import plot_uncertainty, uncertainty_maps
from bdlens.uncertainty import has_design

log = logging.getLogger(__name__)

#: Fields shown when none are asked for (those every system and the truth have).
DEFAULT_FIELDS: tuple[tuple[str, int | None], ...] = (("geopotential", 500), ("temperature", 850), ("2m_temperature", None))
NOT_RECORDED = "not recorded"
#: A relative residual of the law of total variance below this is rounding (float32 members).
ROUNDING = 1e-4


@dataclass(frozen=True)
class Field:
    """One variable, at one pressure level (hPa) if it has levels."""

    variable: str
    level: int | None = None

    @property
    def label(self) -> str:
        return self.variable if self.level is None else f"{self.variable} {self.level} hPa"

    @property
    def key(self) -> str:
        return self.variable if self.level is None else f"{self.variable}_{self.level}"

    @classmethod
    def parse(cls, text: str) -> Field:
        """``VARIABLE`` or ``VARIABLE:LEVEL`` (hPa), e.g. ``geopotential:500``."""
        name, _, level = text.partition(":")
        try:
            return cls(name, int(level) if level else None)
        except ValueError as err:
            raise BdlensError(f"field {text!r} is not VARIABLE or VARIABLE:LEVEL with LEVEL in hPa (e.g. geopotential:500)") from err


@dataclass(frozen=True)
class System:
    """One forecasting system of the report: its name, where it came from and its data (lazy)."""

    name: str
    data: xr.Dataset
    path: str | None = None
    member_dim: str = "number"

    @property
    def members(self) -> int:
        """M; 1 for a deterministic forecast (no member dim)."""
        return self.data.sizes.get(self.member_dim, 1)

    @property
    def design(self) -> bool:
        return self.members >= 4 and has_design(self.data, self.member_dim)

    def attr(self, key: str) -> Any:
        """A global attribute of the forecast, or :data:`NOT_RECORDED`."""
        value = self.data.attrs.get(key)
        return NOT_RECORDED if value is None or value == "" else value


def _grid(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    return ds["latitude"].values, ds["longitude"].values


def _same_grid(a: xr.Dataset, b: xr.Dataset) -> bool:
    return all(x.shape == y.shape and np.allclose(x, y) for x, y in zip(_grid(a), _grid(b), strict=True))


def _describe_grid(ds: xr.Dataset) -> str:
    return f"{ds.sizes['longitude']}x{ds.sizes['latitude']}"


def choose_fields(systems: Sequence[System], truth: xr.Dataset, fields: Sequence[Field] | None) -> list[Field]:
    """The asked fields, checked to exist everywhere, or the defaults every system and the truth have."""
    sources = [(s.name, s.data) for s in systems] + [("the truth", truth)]

    def missing(field: Field) -> str | None:
        for name, ds in sources:
            if field.variable not in ds.data_vars:
                return f"{name} has no variable {field.variable}"
            has_levels = "level" in ds[field.variable].dims
            if (field.level is None) == has_levels:
                return f"{field.variable} {'has levels: give one, e.g. ' + field.variable + ':500' if has_levels else 'has no levels'}"
            if has_levels and field.level not in ds["level"].values:
                return f"{name} has no level {field.level} hPa of {field.variable}"
        return None

    if fields:
        for field in fields:
            problem = missing(field)
            if problem:
                raise BdlensError(f"field {field.label}: {problem}; choose --fields that every forecast and the truth have")
        return list(fields)
    chosen = [f for f in (Field(v, lvl) for v, lvl in DEFAULT_FIELDS) if missing(f) is None]
    if not chosen:
        common = [str(v) for v in systems[0].data.data_vars if all(str(v) in ds.data_vars for _, ds in sources)]
        if not common:
            raise BdlensError("the forecasts and the truth share no variable; check the stores or pass --fields")
        ds = systems[0].data[common[0]]
        chosen = [Field(common[0], int(ds["level"].values[0]) if "level" in ds.dims else None)]
    return chosen


def check_systems(systems: Sequence[System], truth: xr.Dataset, fields: Sequence[Field]) -> list[System]:
    """Raise :class:`BdlensError` for inputs the report cannot score; return the systems on their common inits.

    Checks: one grid for all systems and the truth, at least one common initialisation time whose
    valid times the truth covers (the inputs of :func:`bdlens.evaluate.check_inputs`), no field that
    is NaN everywhere in a system or the truth (one lazy pass over the selected fields).
    """
    if not systems:
        raise BdlensError("no forecasts given; pass --forecasts NAME=PATH at least once")
    first = systems[0]
    for system in systems[1:]:
        if not _same_grid(first.data, system.data):
            raise BdlensError(
                f"systems on different grids: {first.name} is {_describe_grid(first.data)}, {system.name} is {_describe_grid(system.data)}; "
                "regrid them to one grid"
            )
    common = first.data["time"].values
    for system in systems[1:]:
        common = np.intersect1d(common, system.data["time"].values)
    if common.size == 0:
        spans = ", ".join(f"{s.name} {np.datetime_as_string(s.data.time.values[0], 'h')}..{np.datetime_as_string(s.data.time.values[-1], 'h')}" for s in systems)
        raise BdlensError(f"the systems share no initialisation time ({spans}); forecast the same init times")
    systems = [System(s.name, s.data.sel(time=common), s.path, s.member_dim) for s in systems]
    variables = sorted({f.variable for f in fields})
    for system in systems:
        check_inputs(system.name, system.data, truth, system.member_dim, variables, deterministic=True)
    probes = {(s.name, f.label): _field(s.data, f).notnull().any() for s in systems for f in fields}
    probes.update({("the truth", f.label): _field(truth, f).notnull().any() for f in fields})
    (valid,) = dask.compute(probes)
    empty = [f"{label} of {name}" for (name, label), ok in valid.items() if not bool(ok)]
    if empty:
        raise BdlensError(f"only NaN in {', '.join(empty)}; fix the store or leave the field out with --fields")
    return systems


def _field(ds: xr.Dataset, field: Field) -> xr.DataArray:
    da = ds[field.variable]
    return da.sel(level=field.level) if field.level is not None else da


def _png(fig: Any) -> str:
    """A matplotlib Figure as a base64 PNG (the report embeds its figures)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: float, digits: int = 4) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


@dataclass
class Scored:
    """The evaluation of one variable for every system (output of :func:`bdlens.evaluate.evaluate`)."""

    result: xr.Dataset
    units: str

    def field(self, field: Field) -> xr.Dataset:
        return self.result.sel(level=field.level) if field.level is not None else self.result


def score(systems: Sequence[System], truth: xr.Dataset, fields: Sequence[Field], quantiles: Sequence[float], seed: int) -> dict[str, Scored]:
    """Every registry metric (scores, diagnostics and theorem checks) per variable, for all systems."""
    out = {}
    for variable in sorted({f.variable for f in fields}):
        levels = sorted({f.level for f in fields if f.variable == variable and f.level is not None})

        def pick(ds: xr.Dataset, variable: str = variable, levels: list[int] = levels) -> xr.Dataset:
            return ds[[variable]].sel(level=levels) if levels else ds[[variable]]

        result = evaluate(
            {s.name: pick(s.data) for s in systems},
            pick(truth),
            member_dim=systems[0].member_dim,
            variables=[variable],
            quantiles=quantiles,
            seed=seed,
            metrics=list(registry.METRICS),
            deterministic=True,
        )
        units = str(truth[variable].attrs.get("units", systems[0].data[variable].attrs.get("units", "")))
        out[variable] = Scored(result, figures.pretty_units(units))
    return out


def _checks(system: System, field: Field, scored: xr.Dataset) -> dict[str, str]:
    """The docs/science.md §6 theorem checks of one system and field, over all leads: a value and a verdict per check."""
    v = field.variable

    def series(name: str) -> np.ndarray:
        return scored[f"{v}_{name}"].sel(forecast=system.name).values if f"{v}_{name}" in scored else np.array([np.nan])

    row = {"system": system.name, "field": field.label}
    ratio = series("calibration_ratio")
    if system.members > 1 and np.isfinite(ratio).any():
        low, high = np.nanmin(ratio), np.nanmax(ratio)
        under, over = high > 1.25, low < 0.8
        verdict = "calibrated (0.8 to 1.25)" if not (under or over) else ("over- and under-dispersive by lead" if under and over else ("under-dispersive" if under else "over-dispersive"))
        row.update(calibration=f"{_fmt(low, 3)} … {_fmt(high, 3)}", calibration_verdict=verdict)
    else:
        row.update(calibration="—", calibration_verdict="needs an ensemble")
    if not system.design:
        row.update(total_variance="—", total_variance_verdict="needs a K × J design", mixture_crps="—", mixture_crps_verdict="needs a K × J design")
        return row
    residual = np.nanmax(series("total_variance_relative_residual"))
    gap, mixture = series("mixture_crps_gap"), series("mixture_crps_mixture")
    row.update(
        total_variance=f"{residual:.1e}",
        total_variance_verdict="holds (rounding level)" if residual < ROUNDING else "FAILS: the design coordinates do not describe the members",
        mixture_crps=f"gap {_fmt(np.nanmin(gap), 3)} … {_fmt(np.nanmax(gap), 3)}, mixture CRPS {_fmt(np.nanmean(mixture), 4)}",
        mixture_crps_verdict="holds" if np.nanmin(gap) >= 0 else "FAILS",
    )
    return row


def _headline(scored: xr.Dataset, field: Field, systems: Sequence[System]) -> dict[str, Any]:
    """Scores at up to three leads every system has: first, middle and last."""
    v = field.variable
    crps = scored[v].sel(metric="crps_standard")
    common = crps[LEAD_DIM].values[crps.notnull().all("forecast").values]
    picks = sorted({common[0], common[len(common) // 2], common[-1]}) if common.size else []
    metrics = [("crps", "fair CRPS"), ("rmse", "RMSE"), ("spread_skill_corrected", "spread-skill")]
    rows = []
    for system in systems:
        row = {"system": system.name}
        for lead in picks:
            for metric, _ in metrics:
                # One member: the (standard) CRPS is the MAE, marked with an asterisk.
                name = "crps_standard" if metric == "crps" and system.members == 1 else metric
                value = scored[v].sel(forecast=system.name, metric=name, **{LEAD_DIM: lead}).item() if name in scored.metric else np.nan
                row[f"{metric}@{lead}"] = _fmt(value) + ("*" if name != metric else "")
        rows.append(row)
    leads = [int(lead / np.timedelta64(1, "h")) for lead in picks]
    return {"leads": list(zip(leads, picks, strict=True)), "metrics": metrics, "rows": rows}


def _provenance(system: System) -> dict[str, Any]:
    checkpoints = system.attr("checkpoints")
    if checkpoints != NOT_RECORDED:
        try:
            checkpoints = ", ".join(f"{k}: {str(h)[:16]}" for k, h in json.loads(checkpoints).items())
        except (json.JSONDecodeError, AttributeError):
            checkpoints = str(checkpoints)
    config = system.attr("config")
    if config != NOT_RECORDED:
        try:
            config = json.dumps(json.loads(config), indent=2, sort_keys=True)
        except json.JSONDecodeError:
            config = str(config)
    return {
        "system": system.name,
        "description": system.attr("system") if system.attr("system") != NOT_RECORDED else system.attr("title"),
        "path": system.path or "in memory",
        "command": system.attr("command"),
        "seed": system.attr("seed"),
        "checkpoints": checkpoints,
        "bdlens_version": system.attr("bdlens_version"),
        "config": config,
    }


def _cost(system: System, crps_at: tuple[Field, np.timedelta64, xr.Dataset] | None) -> dict[str, Any]:
    row = {
        "system": system.name,
        "members": system.members,
        "network_evaluations_per_member_step": system.attr("network_evaluations_per_member_step"),
        "wall_seconds_per_member_step": system.attr("wall_seconds_per_member_step"),
    }
    if crps_at is not None:
        field, lead, scored = crps_at
        metric = "crps" if system.members > 1 else "crps_standard"
        row["crps"] = _fmt(scored[field.variable].sel(forecast=system.name, metric=metric, **{LEAD_DIM: lead}).item())
    return row


def build_report(
    systems: Sequence[System],
    truth: xr.Dataset,
    fields: Sequence[Field] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    seed: int = 0,
    truth_path: str | None = None,
) -> tuple[str, dict[str, pd.DataFrame]]:
    """The report's HTML page and its CSV tables (name → DataFrame); nothing is written.

    Inputs are checked first (:func:`check_systems`); every system is then scored on the
    initialisation times they all share.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    fields = choose_fields(systems, truth, fields)
    systems = check_systems(systems, truth, fields)
    members = {s.name: s.members for s in systems}
    design = [s for s in systems if s.design]
    with bar(total=2 + len(fields) + len(design), desc="report", unit="step") as progress:
        scored = score(systems, truth, fields, quantiles, seed)
        progress.update(1)
        sections = []
        shares: dict[str, xr.DataArray] = {}
        for field in fields:
            res, units = scored[field.variable].field(field), scored[field.variable].units
            v, label = field.variable, field.label
            plots = [
                ("Skill vs lead", figures.skill_vs_lead(res, v, label, units, members)),
                ("Rank histograms", figures.rank_histograms(res, v, label, members)),
                ("Reliability diagrams", figures.reliability_diagrams(res, v, label, members)),
                ("Spread vs error", figures.spread_vs_error(res, v, label, units, members)),
                ("Zonal power spectra", figures.spectra(res, v, label, units, members)),
            ]
            for system in design:
                epistemic = res[v].sel(forecast=system.name, metric="epistemic_variance")
                shares[f"{system.name}: {label}"] = epistemic / (epistemic + res[v].sel(forecast=system.name, metric="aleatoric_variance"))
            sections.append(
                {
                    "field": field,
                    "headline": _headline(res, field, systems),
                    "figures": [{"title": t, "png": _png(f)} for t, f in plots if f is not None],
                    "checks": [_checks(s, field, res) for s in systems],
                }
            )
            progress.update(1)
        decomposition = []
        for system in design:
            maps = uncertainty_maps(system.data, variables=sorted({f.variable for f in fields}), levels=sorted({f.level for f in fields if f.level}) or None)
            lead = system.data[LEAD_DIM].values[-1]
            maps = maps.sel({LEAD_DIM: [lead]}).isel(time=[0]).compute()
            decomposition.append(
                {
                    "system": system.name,
                    "design": f"K = {len(np.unique(system.data['weight_sample']))} weight samples × J = {len(np.unique(system.data['perturbation_draw']))} draws",
                    "maps": [{"field": f, "png": _png(plot_uncertainty(maps, f.variable, level=f.level))} for f in fields],
                }
            )
            progress.update(1)
        share_png = _png(figures.epistemic_share(shares, "area-mean epistemic share vs lead")) if shares else None
        first, longest = fields[0], None
        res0 = scored[first.variable].field(first)
        common = res0[first.variable].sel(metric="crps_standard").notnull().all("forecast")
        if bool(common.any()):
            longest = (first, res0[LEAD_DIM].values[common.values][-1], res0)
        cost = [_cost(s, longest) for s in systems]
        provenance = [_provenance(s) for s in systems]
        checks = [row for section in sections for row in section["checks"]]
        env = Environment(loader=PackageLoader("bdlens.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
        html = env.get_template("report.html.j2").render(
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
            truth_path=truth_path or "in memory",
            inits=[np.datetime_as_string(t, unit="h") for t in systems[0].data["time"].values],
            systems=systems,
            members=members,
            fields=fields,
            sections=sections,
            decomposition=decomposition,
            share_png=share_png,
            cost=cost,
            cost_crps=(f"{longest[0].label}, +{longest[1] / np.timedelta64(1, 'h'):g} h" if longest else None),
            provenance=provenance,
            checks=checks,
            metrics=[m for m in registry.METRICS.values()],
            not_recorded=NOT_RECORDED,
        )
        progress.update(1)
    tables = {
        "scores": pd.concat([to_table(scored[v].result) for v in scored], ignore_index=True),
        "checks": pd.DataFrame(checks),
        "cost": pd.DataFrame(cost),
        "provenance": pd.DataFrame(provenance),
    }
    return html, tables


def write_report(
    forecasts: Mapping[str, str | Path | xr.Dataset],
    truth: str | Path | xr.Dataset,
    out: str | Path,
    fields: Sequence[Field | str] | None = None,
    member_dim: str = "number",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the report of ``forecasts`` (name → store path or Dataset) against ``truth`` to directory ``out``.

    ``out`` gets ``report.html`` (self-contained: figures embedded as base64 PNG, no scripts) and the
    tables ``scores.csv`` (long table, as ``bdlens evaluate --out x.csv``), ``checks.csv``,
    ``cost.csv`` and ``provenance.csv``. Cost and provenance come from each forecast's global
    attributes (the bdlens forecast layout); missing ones read "not recorded". ``fields``:
    ``Field``s or ``"variable[:level]"`` strings (default Z500, T850, 2m temperature where present).
    Raises :class:`BdlensError` before any computation for bad inputs; writes nothing unless the
    whole report succeeds.
    """
    paths = {name: None if isinstance(p, xr.Dataset) else str(p) for name, p in forecasts.items()}
    truth_path = None if isinstance(truth, xr.Dataset) else str(truth)
    inputs = [*paths.values(), truth_path]
    prepare_output(out, "report", overwrite=overwrite, inputs=inputs, dry_run=True)
    systems = [
        System(name, p if isinstance(p, xr.Dataset) else open_data(p), paths[name], member_dim) for name, p in forecasts.items()
    ]
    truth_data = truth if isinstance(truth, xr.Dataset) else open_data(truth)
    parsed = [f if isinstance(f, Field) else Field.parse(f) for f in fields] if fields else None
    html, tables = build_report(systems, truth_data, parsed, quantiles, seed, truth_path)
    return _write_directory(out, html, tables, overwrite, inputs)


def _write_directory(out: str | Path, html: str, tables: Mapping[str, pd.DataFrame], overwrite: bool,
                     inputs: Sequence[str | None]) -> Path:
    """Write ``report.html`` and ``<name>.csv`` per table to the report directory ``out``, atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mark_output(tmp, "report")
        (tmp / "report.html").write_text(html, encoding="utf-8")
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
        prepare_output(out, "report", overwrite=overwrite, inputs=inputs)  # replaces an earlier report only now
        if out.exists():
            out.rmdir()  # left only if it was empty
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("report written to %s", out / "report.html")
    return out


@dataclass
class Section:
    """One section of a :func:`write_page` page: notes, then tables (caption, DataFrame), then figures (title, Figure)."""

    id: str
    title: str
    notes: Sequence[str] = ()
    tables: Sequence[tuple[str, pd.DataFrame]] = ()
    figures: Sequence[tuple[str, Any]] = ()


def _cell(value: Any) -> dict[str, Any]:
    """A table cell: numbers right-aligned to 4 significant digits; verdicts that start with
    "met" / "not met" / "holds" / "FAILS" coloured."""
    if isinstance(value, int | float | np.number) and not isinstance(value, bool):
        return {"text": _fmt(float(value)), "num": True}
    text = str(value)
    verdict = "bad" if text.startswith(("not met", "FAILS")) else ("ok" if text.startswith(("met", "holds")) else "")
    return {"text": text, "num": False, "verdict": verdict}


def write_page(
    out: str | Path,
    title: str,
    subtitle: Sequence[str],
    sections: Sequence[Section],
    tables: Mapping[str, pd.DataFrame] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | None] = (),
) -> Path:
    """Write a report directory ``out`` of precomputed results (as :func:`write_report` writes one of
    forecasts): ``report.html``, one self-contained page with ``sections`` in the report's style, and
    ``tables`` as ``<name>.csv``. Raises :class:`BdlensError` before writing if ``out`` may not be replaced."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    prepare_output(out, "report", overwrite=overwrite, inputs=inputs, dry_run=True)
    env = Environment(loader=PackageLoader("bdlens.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    rendered = [
        {
            "id": s.id,
            "title": s.title,
            "notes": list(s.notes),
            "tables": [{"caption": caption, "columns": [str(c) for c in frame.columns],
                        "rows": [[_cell(v) for v in row] for row in frame.itertuples(index=False)]} for caption, frame in s.tables],
            "figures": [{"title": t, "png": _png(f)} for t, f in s.figures if f is not None],
        }
        for s in sections
    ]
    html = env.get_template("page.html.j2").render(
        title=title, subtitle=list(subtitle), sections=rendered, generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), version=__version__
    )
    return _write_directory(out, html, dict(tables or {}), overwrite, inputs)
