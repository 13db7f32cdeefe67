"""The demo study (issue 16): does the hybrid ensemble beat the baselines, and at what cost?

Every system forecasts from the analysis at ``--inits`` test-period inits ``--every-days`` apart and
is verified against the truth at ``--leads``. The work is cut into units, one per (system, init):
each unit runs its forecast (through the ensemble engine, one store per unit in the work directory),
reduces it to additive statistics per field and lead (CRPS, squared error, variance, rank histogram,
energy score, the docs/science.md §6 check terms), writes them as one JSON file
(atomically) and deletes the forecast. A killed run resumes with the same command: finished units
are read back, a unit cut short resumes its forecast store, and the results are identical to an
uninterrupted run. A unit's file name holds a hash of everything that determines it (system options,
members, leads, seed, checkpoint hashes), so changing an option computes new units beside the old.
The units are scores only, so they may be computed over several sessions or machines.

The cost is measured apart from the units, in a cost pass at the end of the run that writes the
results: every system forecasts the first init once more, back to back on the same machine (the
physics ensemble is run here for it even when ``--physics`` gives its store), so the costs are
comparable whatever else ran beside the units. ``--no-cost`` skips it for intermediate runs.

From the units: ``--out`` (tidy CSV: system, variable, lead_hours, metric, value; cost rows have
variable ``all`` and lead_hours −1), the generated section of ``--readme`` (tables and the issue's
goals, each judged from the numbers) and the HTML page ``--report``/report.html. Metrics and their
conventions: evaluation/README.md ("How the study scores").

    python evaluation/study.py [--systems deterministic hybrid ...] [--inits 20] [--every-days 5]
        [--leads 6h 1d 2d 3d 5d 7d 10d] [--members 20] [--hybrid-members 100] [--weights K]
        [--deep-ensemble CKPT ...] [--physics PHYS.zarr] [--world DIR] [--period START END]
        [--work evaluation/runs/study] [--out evaluation/results/study.csv] [--readme evaluation/README.md]
        [--report evaluation/results/study_report] [--threads N] [--device auto] [--no-cost]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.stats import t as student_t

from bdlens.checkpoint import BUNDLED_DIR, bundled_checkpoint, read_manifest
from bdlens.configs import config_path
from bdlens.data import NormStats, open_dataset
from bdlens.ensemble import Forecaster
from bdlens.ensemble.design import PERTURBATION_DRAW, WEIGHT_SAMPLE, Design
from bdlens.ensemble.engine import parse_hours
from bdlens.ensemble.system import KINDS, load_system
from bdlens.errors import BdlensError
from bdlens.metrics import crps, energy_score, ensemble_mean_mse, rank_histogram
from bdlens.metrics.probabilistic import mean_variance_and_mse
from bdlens.outputs import check_output_file, mark_output, partial_path, prepare_output
from bdlens.progress import bar
from bdlens.uncertainty import decompose, has_design, mixture_crps_check, total_variance_check
from bdlens.world.build import build
from bdlens.world.build import read_manifest as read_world_manifest
from bdlens.world.ensemble import physics_ensemble

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIELDS, demo_world_split, field, realization, test_inits, verification  # noqa: E402
from ensemble_skill import SYSTEMS, engine_options  # noqa: E402
from study_report import write_html, write_readme  # noqa: E402

log = logging.getLogger("bdlens.study")

#: The issue's systems, in table order; ``--systems`` may also name the other engine systems of ensemble_skill.
STUDY_SYSTEMS = ("deterministic", "epistemic", "aleatoric", "hybrid", "hybrid-learned", "ic", "deep-ensemble", "deep-ensemble-sppt",
                 "diffusion", "physics", "climatology", "persistence")
DEFAULT_LEADS = ("6h", "1d", "2d", "3d", "5d", "7d", "10d")
#: Part of every unit's key: bump it when the unit statistics change, so old units are not reused.
STATS_VERSION = 1
DIMS = ("time", "latitude", "longitude")
CSV_COLUMNS = ("system", "variable", "lead_hours", "metric", "value")
#: The multivariate energy score's vector: every headline field in units of its climatological std.
ALL = "all"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line :class:`BdlensError`s (exit 2 from :func:`main`, no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BdlensError(message)


# ---------------------------------------------------------------------------------------------- systems


@dataclass
class Plan:
    """One system of the study: the leads it reports, its unit key and how to forecast one init.

    ``run(init, scratch)`` returns the headline fields (dims number, time = [init], prediction_timedelta
    = ``leads``, latitude, longitude; loaded) and the cost ({"seconds", "member_steps", "member_days",
    "network_evaluations_per_member_step"}, or None when the forecast was not run here); ``timed`` (default
    ``run``) is what the cost pass runs when ``run`` does not forecast (a physics store made elsewhere).
    """

    name: str
    members: int
    leads: list[int]
    identity: dict[str, Any]
    run: Callable[[np.datetime64, Path], tuple[xr.Dataset, dict[str, float] | None]]
    notes: list[str] = dataclass_field(default_factory=list)
    timed: Callable[[np.datetime64, Path], tuple[xr.Dataset, dict[str, float] | None]] | None = None

    @property
    def key(self) -> str:
        text = json.dumps({"stats_version": STATS_VERSION, "name": self.name, "leads": self.leads, **self.identity}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def headline_fields(ds: xr.Dataset) -> xr.Dataset:
    """The headline fields of ``ds`` named by their keys (z500, …), lazily."""
    return xr.Dataset({key: field(ds, key).drop_vars("level", errors="ignore") for key in FIELDS})


def headline(ds: xr.Dataset, leads: Sequence[int]) -> xr.Dataset:
    """The headline fields of a forecast at ``leads`` (hours), loaded."""
    wanted = np.asarray(leads, dtype="timedelta64[h]").astype("timedelta64[ns]")
    return headline_fields(ds.sel(prediction_timedelta=wanted)).load()


def output_hours(steps: Sequence[int], leads: Sequence[int]) -> int:
    """The output step of a system whose models step ``steps`` hours: the finest step the requested
    leads share (their gcd) that its shortest model can reach (a multiple of it)."""
    return math.lcm(reduce(math.gcd, leads), min(steps))


def lead_groups(steps: Sequence[int], leads: Sequence[int]) -> list[tuple[list[int], int]]:
    """The engine runs that produce ``leads`` (hours) with models of ``steps`` hours: (leads, output step).

    The leads that are multiples of the longest step come from one run at that output step; the
    others (the 6 h lead) from a second, short run at their finer step. One run at the finest step
    would also compute every intermediate 6-hourly state of the 10 days (the anchored plan of
    docs/science.md §3 with two input times), about four times the network calls, for states that
    are not verified; the verified states are the same either way.
    """
    coarse = [lead for lead in leads if lead % max(steps) == 0]
    fine = [lead for lead in leads if lead % max(steps) != 0]
    groups = [(coarse, max(steps))] if coarse else []
    if fine:
        step = output_hours(steps, fine)
        groups.append(([lead for lead in fine if lead % step == 0], step))
    return [(group, step) for group, step in groups if group]


def _stored_cost(ds: xr.Dataset) -> dict[str, float]:
    """The cost an engine run recorded: its wall seconds, member-steps, member-days and network evaluations per member-step."""
    member_steps = float(ds.attrs["member_steps"])
    days = float(ds.prediction_timedelta.values.max() / np.timedelta64(24, "h"))
    return {"seconds": float(ds.attrs["wall_seconds_per_member_step"]) * member_steps, "member_steps": member_steps,
            "member_days": ds.sizes["number"] * days,
            "network_evaluations_per_member_step": float(ds.attrs["network_evaluations_per_member_step"])}


def _engine_forecast(forecaster: Forecaster, options: dict[str, Any], init: np.datetime64, store: Path,
                     analysis: xr.Dataset, leads: list[int]) -> tuple[xr.Dataset, dict[str, float]]:
    """One engine run from ``init`` into ``store`` (resumed when a killed run left it), reduced to the headline fields."""
    iso = np.datetime_as_string(init, unit="h")
    resume = store.exists() and any(store.iterdir())
    try:
        ds = forecaster.ensemble(init=[iso], data=analysis, out=store, resume=resume, **options)
    except BdlensError:
        if not resume:
            raise
        # A store killed while its metadata was being created cannot be resumed; it is ours (inside the
        # unit's scratch directory of the work directory), so start it again.
        shutil.rmtree(store)
        ds = forecaster.ensemble(init=[iso], data=analysis, out=store, **options)
    return headline(ds, leads), _stored_cost(ds)


def _grouped_forecast(forecaster: Forecaster, options: dict[str, Any], groups: list[tuple[list[int], int]], init: np.datetime64,
                      scratch: Path, analysis: xr.Dataset) -> tuple[xr.Dataset, dict[str, float]]:
    """The engine runs of :func:`lead_groups` from ``init``, joined along lead; their costs summed (the
    network evaluations per member-step are the whole forecast's)."""
    scratch.mkdir(parents=True, exist_ok=True)
    parts, costs = [], []
    for i, (leads, step) in enumerate(groups):
        ds, cost = _engine_forecast(forecaster, options | {"lead": f"{max(leads)}h", "output_step": f"{step}h"}, init,
                                    scratch / f"forecast{i}.zarr", analysis, leads)
        parts.append(ds)
        costs.append(cost)
    return xr.concat(parts, dim="prediction_timedelta"), _sum_costs(costs)


def _sum_costs(costs: list[dict[str, float]]) -> dict[str, float]:
    """Several runs' costs as one: seconds, member-steps and member-days summed, network evaluations
    per member-step averaged over the member-steps."""
    total = {k: sum(c[k] for c in costs) for k in ("seconds", "member_steps", "member_days")}
    evaluations = sum(c["network_evaluations_per_member_step"] * c["member_steps"] for c in costs) / total["member_steps"]
    return total | {"network_evaluations_per_member_step": evaluations}


def _steps(forecaster: Forecaster, options: dict[str, Any], seed: int, analysis: xr.Dataset, max_lead: int,
           inits: np.ndarray) -> tuple[int, ...]:
    """The step lengths (hours) the system's member source can use; loads and checks its checkpoints."""
    model = options.get("model", "hybrid")
    bayes = bool(options.get("bayes", True)) and model == "hybrid"
    perturbation = options.get("perturbation", "none") if model == "hybrid" else "none"
    weights = options.get("weights") or forecaster.default_weights(options["members"], bayes)
    source, _ = forecaster.source(Design.of(options["members"], weights), perturbation, bayes, seed, model=model, data=analysis,
                                  max_lead=max_lead, inits=inits)
    return tuple(source.steps)


def _reached(name: str, groups: list[tuple[list[int], int]], leads: list[int]) -> tuple[list[int], list[str]]:
    """The leads a system reports (ascending) and the note saying which it cannot reach."""
    reached = sorted(lead for group, _ in groups for lead in group)
    if not reached:
        raise BdlensError(f"system {name} reaches none of --leads {leads} h; ask for multiples of its model steps")
    return reached, [f"{name}: its models reach only the leads {reached} h"] if reached != leads else []


def calibration_used(forecaster: Forecaster, options: dict[str, Any]) -> dict[str, Any]:
    """The part of the system's calibration (``ensemble.json``) that a run with ``options`` reads, for its
    unit key: its scheme's entry (amplitude, temperature, per-lead factors, config and that config's
    content) and, for posterior
    runs without an explicit K, the default K. So recalibrating SPPT re-keys only the systems that use it."""
    if options.get("model", "hybrid") != "hybrid":
        return {}
    perturbation, bayes = options.get("perturbation", "none"), options.get("bayes", True)
    if perturbation == "default":
        perturbation = forecaster.default_perturbation()
    used: dict[str, Any] = {"scheme": perturbation}
    if perturbation != "none" or bayes:  # the deterministic weights without a scheme read no calibration
        used["settings"] = forecaster.system.scheme(perturbation, bayes)
        if "config" in used["settings"]:  # the scheme's YAML by content: a changed config re-keys its systems
            used["config_sha256"] = hashlib.sha256(config_path(used["settings"]["config"]).read_bytes()).hexdigest()
    if bayes and options.get("weights") is None:
        used["default_weights"] = forecaster.system.settings.get("default_weights")
    return used


def kinds_read(options: dict[str, Any]) -> tuple[str, ...]:
    """The checkpoint kinds (:data:`bdlens.ensemble.system.KINDS`) whose weights a run with ``options`` reads,
    for its unit key, so that rebundling the posterior re-keys only the posterior systems: the diffusion
    model, or the posterior or deterministic weights with the perturbation networks of the learned scheme.
    Persistence and climatology read no weights; they take the deterministic models' field layout."""
    model = options.get("model", "hybrid")
    if model == "diffusion":
        return ("diffusion",)
    if model != "hybrid":
        return ("deterministic",)
    return ("vi" if options.get("bayes", True) else "deterministic",) + (("perturbation",) if options.get("perturbation") == "learned" else ())


def engine_plan(name: str, forecaster: Forecaster, members: int, weights: int | None, leads: list[int], seed: int,
                analysis: xr.Dataset, inits: np.ndarray) -> Plan:
    """A system of :data:`ensemble_skill.SYSTEMS`, run through the engine in the runs of :func:`lead_groups`."""
    options = engine_options(name, members, weights, lead="1h")
    groups = lead_groups(_steps(forecaster, options, seed, analysis, max(leads), inits), leads)
    reached, notes = _reached(name, groups, leads)
    options = {k: v for k, v in options.items() if k not in ("lead", "output_step")} | {"seed": seed}
    identity = {"options": options, "groups": groups, "checkpoints": forecaster.system.hashes(kinds_read(options)),
                "calibration": calibration_used(forecaster, options)}
    return Plan(name, members, reached, identity,
                lambda init, scratch: _grouped_forecast(forecaster, options, groups, init, scratch, analysis), notes)


#: The deep-ensemble members trained with other seeds (evaluation/README.md, "The deep-ensemble members").
DEEP_ENSEMBLE_DIR = Path(__file__).resolve().parent / "deep_ensemble"


def default_deep_ensemble() -> list[Path]:
    """The bundled det_24h and the checkpoints under :data:`DEEP_ENSEMBLE_DIR`; none when that folder is empty."""
    members = sorted(p for p in DEEP_ENSEMBLE_DIR.glob("*") if (p / "manifest.json").is_file())
    return [BUNDLED_DIR / "det_24h", *members] if members else []


def deep_ensemble_system(path: Path, device: str) -> Forecaster:
    """A deep-ensemble member: the deterministic checkpoint(s) at ``path`` (a checkpoint, a run directory
    or a folder of them, as :func:`load_system` reads it), with the bundled deterministic models for the
    step lengths it lacks (e.g. a 24 h model gets the bundled 6 h one)."""
    try:
        system = load_system(path)
    except BdlensError as err:
        raise BdlensError(f"--deep-ensemble {path} is not a checkpoint directory: {err}") from None
    if not system.checkpoints["deterministic"]:
        raise BdlensError(f"--deep-ensemble {path} holds no deterministic checkpoint; pass `bdlens train deterministic` outputs")
    for step, bundled in load_system(BUNDLED_DIR).checkpoints["deterministic"].items():
        system.checkpoints["deterministic"].setdefault(step, bundled)
    return Forecaster(system, device)


def deep_ensemble_plan(paths: Sequence[Path], device: str, leads: list[int], seed: int, analysis: xr.Dataset,
                       inits: np.ndarray, draws: int = 1) -> Plan:
    """The deep ensemble: one deterministic member per checkpoint (no Bayes, no perturbation),
    concatenated along ``number`` (K = models, J = 1). With ``draws`` > 1 (system ``deep-ensemble-sppt``)
    every model makes ``draws`` members with SPPT at the bundled system's calibration, each model with
    its own noise seed (K = models × J = draws): the hybrid with a deep ensemble in place of the posterior."""
    forecasters = [deep_ensemble_system(Path(p), device) for p in paths]
    name, options = "deep-ensemble", {"members": 1, "bayes": False, "perturbation": "none", "seed": seed}
    if draws > 1:
        name, options = "deep-ensemble-sppt", {"members": draws, "bayes": False, "perturbation": "sppt", "seed": seed}
        calibration = load_system(BUNDLED_DIR).settings
        for forecaster in forecasters:
            forecaster.system.settings = calibration
    steps = sorted({step for f in forecasters for step in _steps(f, options, seed, analysis, max(leads), inits)})
    # A lead shorter than the step every member has of its own (the 6 h lead of 24 h members) would
    # come from the one bundled model they all borrow: copies, not an ensemble, so it is not reported.
    own = set.intersection(*(set(load_system(Path(p)).checkpoints["deterministic"]) for p in paths))
    groups = lead_groups(steps, [lead for lead in leads if not own or lead % min(own) == 0])
    reached, notes = _reached(name, groups, leads)

    def run(init: np.datetime64, scratch: Path) -> tuple[xr.Dataset, dict[str, float]]:
        parts, costs = [], []
        for i, forecaster in enumerate(forecasters):
            mine = options | {"seed": seed + i} if draws > 1 else options
            ds, used = _grouped_forecast(forecaster, mine, groups, init, scratch / f"member{i}", analysis)
            parts.append(ds.assign_coords(number=i * draws + np.arange(draws), **{WEIGHT_SAMPLE: ("number", np.full(draws, i)),
                                                                                 PERTURBATION_DRAW: ("number", np.arange(draws))}))
            costs.append(used)
        return xr.concat(parts, dim="number"), _sum_costs(costs)

    identity = {"options": options, "groups": groups, "checkpoints": [f.system.hashes(KINDS) for f in forecasters]}
    if draws > 1:
        identity["calibration"] = calibration_used(forecasters[0], options)
    return Plan(name, len(forecasters) * draws, reached, identity, run, notes)


def physics_run_plan(world: Path, members: int, leads: list[int]) -> Plan:
    """The physics ensemble run here, init by init (`bdlens world ensemble`), so that its cost is measured
    like the others': wall seconds / (members × dynamical-core time steps)."""
    config = read_world_manifest(world)["config"]
    reached = [lead for lead in leads if lead % int(config["output_hours"]) == 0]
    if not reached:
        raise BdlensError(f"the world writes every {config['output_hours']} h and reaches none of --leads {leads} h")
    steps_per_hour = 60.0 / float(config["time_step_minutes"])

    def run(init: np.datetime64, scratch: Path) -> tuple[xr.Dataset, dict[str, float]]:
        store = scratch / "physics.zarr"
        shutil.rmtree(store, ignore_errors=True)  # a store cut short by a kill is not resumable; it is ours
        tick = time.perf_counter()
        physics_ensemble(world, [init], members, max(reached), store)
        seconds = time.perf_counter() - tick
        cost = {"seconds": seconds, "member_steps": members * max(reached) * steps_per_hour, "member_days": members * max(reached) / 24,
                "network_evaluations_per_member_step": 0.0}
        return headline(open_dataset(store), reached), cost

    return Plan("physics", members, reached, {"mode": "run here", "members": members}, run)


def physics_plan(path: Path, leads: list[int], inits: np.ndarray, timed: Plan) -> Plan:
    """The physics ensemble of a `bdlens world ensemble` store at the study's inits (computed elsewhere);
    its cost is measured by running ``timed`` (:func:`physics_run_plan`) in the cost pass."""
    physics = open_dataset(path)
    missing = [np.datetime_as_string(t, unit="h") for t in inits if t not in physics.time.values]
    if missing:
        raise BdlensError(f"--physics {path} lacks the init(s) {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}; "
                          "run `bdlens world ensemble` at the study's inits (they are printed by --dry-run)")
    have = set((physics.prediction_timedelta.values / np.timedelta64(1, "h")).astype(int).tolist())
    reached = [lead for lead in leads if lead in have]
    if not reached:
        raise BdlensError(f"--physics {path} has none of the leads {leads} h (it has {sorted(have)} h)")
    notes = [f"physics: the store has only the leads {reached} h"] if reached != leads else []
    # No path in the key: units are portable between machines (a bdlens physics ensemble is fixed by its
    # world, inits and members, which the attributes, the unit's init and the member count name).
    identity = {"members": int(physics.sizes["number"]), "attrs": {k: str(v) for k, v in sorted(physics.attrs.items())}}
    return Plan("physics", int(physics.sizes["number"]), reached, identity,
                lambda init, scratch: (headline(physics.sel(time=[init]), reached), None), notes, timed=timed.run)


# ---------------------------------------------------------------------------------------------- unit statistics


def climatological_std() -> dict[str, float]:
    """Per headline field: the bundled 6 h model's normalisation std (units of the field), the scale
    of the multivariate energy score (fixed, so units do not depend on the world or the inits)."""
    stats = NormStats.from_dict(read_manifest(bundled_checkpoint("det_6h"))["norm_stats"])
    out = {}
    for key, (variable, level) in FIELDS.items():
        std = stats.field(variable, None if level is None else [level])[1]
        out[key] = float(np.asarray(std).ravel()[0])
    return out


def unit_rows(forecast: xr.Dataset, truth: xr.Dataset, scale: dict[str, float], seed: int) -> list[list]:
    """Additive statistics of one unit: rows [field, lead_hours, statistic, value], each averaged over
    the unit's init and the area (cell-area weighted) unless its name says otherwise.

    Statistics: ``crps`` (fair; standard = MAE for one member), ``mse`` of the ensemble mean,
    ``variance`` (mean unbiased member variance), ``rank_<k>`` (rank-histogram frequencies),
    ``energy_score`` (of the field's map, and for field ``all`` of the four maps in units of
    ``scale``); with a K × J design also ``epistemic``/``aleatoric`` (:func:`decompose`),
    ``tv_total``/``tv_between``/``tv_within`` (population moments of the law of total variance) and
    ``mixture_crps``/``per_sample_crps`` (standard CRPS, docs/science.md §6.3).
    """
    valid = verification(truth, forecast)
    members = forecast.sizes["number"]
    rows: list[list] = []

    def add(key: str, stat: str, values: xr.DataArray) -> None:
        leads = values.prediction_timedelta.values / np.timedelta64(1, "h")
        rows.extend([key, int(lead), stat, float(v)] for lead, v in zip(leads, np.asarray(values.values).ravel(), strict=True))

    for key in FIELDS:
        fc, tr = forecast[key], valid[key]
        add(key, "crps", crps(fc, tr, dims=DIMS, fair=members > 1))
        add(key, "energy_score", energy_score(fc, tr, dims=("time",), fair=members > 1))
        if members < 2:
            add(key, "mse", ensemble_mean_mse(fc, tr, dims=DIMS))
            continue
        variance, mse = mean_variance_and_mse(fc, tr, "number", DIMS)  # over the same valid points
        add(key, "mse", mse)
        add(key, "variance", variance)
        hist = rank_histogram(fc, tr, dims=DIMS, seed=seed)
        for rank in range(members + 1):
            add(key, f"rank_{rank}", hist.sel(rank=rank))
        if has_design(fc):
            parts = decompose(fc, dims=DIMS)
            checks = total_variance_check(fc, dims=DIMS)
            mixture = mixture_crps_check(fc, tr, dims=DIMS)
            for stat, values in (("epistemic", parts["epistemic"]), ("aleatoric", parts["aleatoric"]), ("tv_total", checks["total"]),
                                 ("tv_between", checks["between"]), ("tv_within", checks["within"]),
                                 ("mixture_crps", mixture["mixture"]), ("per_sample_crps", mixture["mean_per_weight_sample"])):
                add(key, stat, values)
    stacked = [(forecast[key] / scale[key], valid[key] / scale[key]) for key in FIELDS]
    fc_all = xr.concat([f for f, _ in stacked], dim="field")
    tr_all = xr.concat([t for _, t in stacked], dim="field")
    add(ALL, "energy_score", energy_score(fc_all, tr_all, vector_dims=("field", "latitude", "longitude"), dims=("time",),
                                          fair=members > 1))
    return rows


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON atomically (a killed run leaves the old file or none, never half of one)."""
    tmp = partial_path(path)
    try:
        tmp.write_text(json.dumps(content))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unit_path(work: Path, plan: Plan, init: np.datetime64) -> Path:
    """Where the unit (``plan``, ``init``) is cached: ``work/units/SYSTEM/INIT-KEY.json``."""
    return work / "units" / plan.name / f"{np.datetime_as_string(init, unit='h')}-{plan.key}.json"


def run_unit(work: Path, plan: Plan, init: np.datetime64, truth: xr.Dataset, scale: dict[str, float], seed: int) -> None:
    """Forecast, reduce and record one (system, init) unit; its forecast stores are deleted afterwards."""
    target = unit_path(work, plan, init)
    scratch = work / "scratch" / plan.name / target.stem
    scratch.mkdir(parents=True, exist_ok=True)
    forecast, _ = plan.run(init, scratch)
    rows = unit_rows(forecast, truth, scale, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_json(target, {"system": plan.name, "init": str(init), "members": int(forecast.sizes["number"]), "rows": rows})
    shutil.rmtree(scratch)


def measure_cost(work: Path, plan: Plan, init: np.datetime64) -> dict[str, float]:
    """The cost pass of one system: its forecast of ``init`` run again (``plan.timed`` or ``plan.run``) and
    timed; wall seconds, member-steps, member-days and network evaluations per member-step."""
    scratch = work / "scratch" / "cost" / plan.name
    shutil.rmtree(scratch, ignore_errors=True)  # a cost pass cut short is simply measured again
    scratch.mkdir(parents=True)
    _, cost = (plan.timed or plan.run)(init, scratch)
    shutil.rmtree(scratch)
    if cost is None:
        raise BdlensError(f"system {plan.name} cannot be timed here")
    return cost


# ---------------------------------------------------------------------------------------------- aggregation


def aggregate(plan: Plan, units: list[dict[str, Any]], cost: dict[str, float] | None) -> list[dict[str, Any]]:
    """The study's tidy rows of one system from its units (in init order): means over inits, then
    RMSE = sqrt(mean MSE), its debiased form sqrt(max(0, mean MSE − mean variance / M)), spread =
    sqrt(mean variance), the corrected spread-skill ratio
    spread / RMSE · sqrt((M+1)/M), the calibration ratio mean MSE / ((M+1)/M · mean variance) and its
    residual (ratio − 1), rank-histogram flatness (M+1) Σ_k (f_k − 1/(M+1))² (0 when flat), the
    relative residual of the law of total variance and the mixture-CRPS gap (≥ 0 by convexity); and
    the cost pass's wall seconds per member-step and per member-day when ``cost`` is given."""
    frame = pd.DataFrame([row for unit in units for row in unit["rows"]], columns=["variable", "lead_hours", "stat", "value"])
    mean = frame.groupby(["variable", "lead_hours", "stat"], sort=True)["value"].mean()
    members = units[0]["members"]
    out: list[dict[str, Any]] = []

    def emit(variable: str, lead: int, metric: str, value: float) -> None:
        out.append({"system": plan.name, "variable": variable, "lead_hours": int(lead), "metric": metric, "value": float(value)})

    for (variable, lead), stats in mean.groupby(level=["variable", "lead_hours"], sort=True):
        s = stats.droplevel(["variable", "lead_hours"])
        if "crps" in s:
            emit(variable, lead, "crps", s["crps"])
            emit(variable, lead, "rmse", math.sqrt(s["mse"]))
        emit(variable, lead, "energy_score", s["energy_score"])
        if "variance" in s:
            factor = (members + 1) / members
            emit(variable, lead, "spread", math.sqrt(s["variance"]))
            # the finite-ensemble estimate of the infinite ensemble's mean error (docs/science.md §7), so
            # that ensembles of different sizes and the deterministic forecast compare on the mean itself
            emit(variable, lead, "rmse_debiased", math.sqrt(max(0.0, s["mse"] - s["variance"] / members)))
            emit(variable, lead, "spread_skill", math.sqrt(s["variance"] / s["mse"] * factor))
            # members without spread (e.g. a deep ensemble of copies) are infinitely overconfident
            ratio = s["mse"] / (factor * s["variance"]) if s["variance"] > 0 else math.inf
            emit(variable, lead, "calibration_ratio", ratio)
            emit(variable, lead, "calibration_residual", ratio - 1.0)
            freq = np.array([s[f"rank_{k}"] for k in range(members + 1)])
            emit(variable, lead, "rank_flatness", (members + 1) * float(((freq - 1.0 / (members + 1)) ** 2).sum()))
        if "tv_total" in s:
            emit(variable, lead, "epistemic_variance", s["epistemic"])
            emit(variable, lead, "aleatoric_variance", s["aleatoric"])
            emit(variable, lead, "total_variance_residual", abs(s["tv_total"] - s["tv_between"] - s["tv_within"]) / s["tv_total"])
            emit(variable, lead, "mixture_crps", s["mixture_crps"])
            emit(variable, lead, "mixture_crps_gap", s["per_sample_crps"] - s["mixture_crps"])
    emit("all", -1, "members", members)
    emit("all", -1, "inits", len(units))
    if cost is not None:
        emit("all", -1, "wall_seconds_per_member_step", cost["seconds"] / cost["member_steps"])
        emit("all", -1, "wall_seconds_per_member_day", cost["seconds"] / cost["member_days"])
        emit("all", -1, "network_evaluations_per_member_step", cost["network_evaluations_per_member_step"])
    return out


#: The system the paired differences are taken against.
REFERENCE = "hybrid"


def paired_rows(plan: Plan, units: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CRPS of ``plan``'s system minus the reference system's, init by init (units in init order): the
    mean over the n inits and the half-width of its 95 % interval t_{0.975, n−1} · sd / √n. Pairing
    cancels the weather common to both forecasts of an init; the interval treats the inits as
    independent, which 5-day spacing only approximates at leads beyond 5 days."""
    def per_init(chosen: list[dict[str, Any]]) -> pd.Series:
        frame = pd.DataFrame([[i, *row] for i, unit in enumerate(chosen) for row in unit["rows"]],
                             columns=["init", "variable", "lead_hours", "stat", "value"])
        return frame[frame.stat == "crps"].set_index(["variable", "lead_hours", "init"]).value

    diff = (per_init(units) - per_init(reference)).dropna()
    out = []
    for (variable, lead), values in diff.groupby(level=["variable", "lead_hours"], sort=True):
        n = len(values)
        half = float(student_t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        for metric, value in ((f"crps_minus_{REFERENCE}", values.mean()), (f"crps_minus_{REFERENCE}_ci95", half)):
            out.append({"system": plan.name, "variable": variable, "lead_hours": int(lead), "metric": metric, "value": float(value)})
    return out


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write the results atomically; an existing file is replaced only if it is a study CSV."""
    check_output_file(path, True, lambda p: p.read_text().split("\n", 1)[0].strip() == ",".join(CSV_COLUMNS), what="study CSV")
    tmp = partial_path(path)
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    here = Path(__file__).resolve().parent
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=list(STUDY_SYSTEMS), metavar="SYSTEM",
                        help=f"systems to run (default: all of {', '.join(STUDY_SYSTEMS)}; also: "
                             f"{', '.join(s for s in SYSTEMS if s not in STUDY_SYSTEMS)})")
    parser.add_argument("--inits", type=int, default=20, help="number of test-period init times")
    parser.add_argument("--every-days", type=int, default=5, help="days between init times")
    parser.add_argument("--leads", nargs="+", default=list(DEFAULT_LEADS), help="verified leads (e.g. 6h 1d 10d)")
    parser.add_argument("--members", type=int, default=20, help="members of every ensemble system but the default hybrid")
    parser.add_argument("--hybrid-members", type=int, default=100, help="members of the default hybrid (SPPT)")
    parser.add_argument("--weights", type=int, help="weight samples K of the hybrids (default: the system's, 10)")
    parser.add_argument("--deep-ensemble", nargs="+", type=Path, default=default_deep_ensemble(), metavar="CKPT",
                        help="deterministic checkpoint directories, one member each (the bundled models fill missing step "
                        "lengths; default: the bundled det_24h and evaluation/deep_ensemble/*)")
    parser.add_argument("--physics", type=Path, help="a `bdlens world ensemble` store at the study's inits (default: run the "
                        "physics ensemble here, --members members, and measure its cost)")
    parser.add_argument("--world", type=Path, help="world directory (default: the default demo world)")
    parser.add_argument("--period", nargs=2, metavar=("START", "END"), help="init period (default: the demo test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=here / "runs" / "study", help="work directory of the cached units")
    parser.add_argument("--out", type=Path, default=here / "results" / "study.csv")
    parser.add_argument("--readme", type=Path, default=here / "README.md", help="README whose generated study section is rewritten")
    parser.add_argument("--report", type=Path, default=here / "results" / "study_report", help="HTML report directory")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost pass (every system's first-init forecast run "
                        "again and timed back to back): for intermediate runs, whose results then have no cost rows")
    parser.add_argument("--dry-run", action="store_true", help="check the options, print the inits and units, run nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def plans(args: argparse.Namespace, world: Path, leads: list[int], analysis: xr.Dataset, inits: np.ndarray) -> list[Plan]:
    """Every requested system's plan, its checkpoints loaded and checked (before any forecast)."""
    forecaster = Forecaster.from_pretrained(device=args.device)
    out = []
    for name in args.systems:
        if name == "deep-ensemble":
            if not args.deep_ensemble:
                log.warning(f"deep-ensemble skipped: no --deep-ensemble CKPT ... given and none in {DEEP_ENSEMBLE_DIR} (train them "
                            "with `bdlens train deterministic --seed N`)")
                continue
            out.append(deep_ensemble_plan(args.deep_ensemble, args.device, leads, args.seed, analysis, inits))
        elif name == "deep-ensemble-sppt":
            if not args.deep_ensemble:
                log.warning("deep-ensemble-sppt skipped: no deep-ensemble members")
                continue
            draws = max(2, math.ceil(args.members / len(args.deep_ensemble)))
            out.append(deep_ensemble_plan(args.deep_ensemble, args.device, leads, args.seed, analysis, inits, draws))
        elif name == "physics":
            here = physics_run_plan(world, args.members, leads)
            out.append(here if args.physics is None else physics_plan(args.physics, leads, inits, here))
        else:
            members = 1 if SYSTEMS[name].get("members") == 1 else (args.hybrid_members if name == "hybrid" else args.members)
            out.append(engine_plan(name, forecaster, members, args.weights, leads, args.seed, analysis, inits))
    return out


def check_args(args: argparse.Namespace) -> list[int]:
    """One-line errors for bad options; returns the leads in hours."""
    known = set(STUDY_SYSTEMS) | set(SYSTEMS)
    unknown = [s for s in args.systems if s not in known]
    if unknown:
        raise BdlensError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(STUDY_SYSTEMS)} "
                          f"(or {', '.join(sorted(known - set(STUDY_SYSTEMS)))})")
    if len(set(args.systems)) != len(args.systems):
        raise BdlensError("--systems names a system twice; give each once")
    for flag in ("inits", "every_days", "members", "hybrid_members"):
        if getattr(args, flag) < 1:
            raise BdlensError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.members < 2 or args.hybrid_members < 2:
        raise BdlensError("--members and --hybrid-members must be at least 2: the ensemble scores need two members")
    if args.threads is not None and args.threads < 1:
        raise BdlensError(f"--threads must be at least 1, got {args.threads}")
    for path in args.deep_ensemble:
        deep_ensemble_system(path, args.device)
    if args.physics is not None and not args.physics.exists():
        raise BdlensError(f"--physics {args.physics} does not exist; make it with `bdlens world ensemble`")
    leads = sorted({parse_hours(text, "--leads") for text in args.leads})
    return leads


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the study; returns the exit code (2 with a one-line message for bad options)."""
    from bdlens.cli import configure_logging

    try:
        args = build_parser().parse_args(argv)
        configure_logging(0, args.quiet)
        return _run(args)
    except BdlensError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    leads = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    world = build() if args.world is None else args.world
    if not (Path(world) / "truth.zarr").exists():
        raise BdlensError(f"--world {world} holds no truth.zarr; pass a `bdlens world build` directory")
    truth = headline_fields(open_dataset(Path(world) / "truth.zarr"))
    analysis = open_dataset(Path(world) / "analysis.zarr")
    period = demo_world_split("test") if args.period is None else tuple(np.datetime64(t) for t in args.period)
    inits = test_inits(truth, max(leads), 24 * args.every_days, period)[: args.inits]
    if len(inits) < args.inits:
        raise BdlensError(f"the period {period[0]}..{period[1]} holds only {len(inits)} inits {args.every_days} days apart with a day of "
                          f"history and {max(leads)} h ahead; ask for fewer --inits or a smaller --every-days")
    chosen = plans(args, Path(world), leads, analysis, inits)
    world_key = _world_key(Path(world))  # read once: it compares the world's analyses with the bundled ones
    for plan in chosen:  # the units of another world are other units
        plan.identity["world"] = world_key
    units = [(plan, init) for plan in chosen for init in inits]
    print(f"inits: {', '.join(np.datetime_as_string(t, unit='h') for t in inits)}", file=sys.stderr)
    if args.dry_run:
        for plan in chosen:
            print(f"{plan.name}: {plan.members} members, leads {plan.leads} h, units {plan.key}", file=sys.stderr)
        init_flags = " ".join(f"--init {np.datetime_as_string(t, unit='h')}" for t in inits)
        print(f"a physics store for --physics: bdlens world ensemble --world {world} {init_flags} --members {args.members} "
              f"--lead-hours {max(leads)} --out PHYS.zarr", file=sys.stderr)
        return 0
    work = Path(args.work)
    resume = work.exists() and any(work.iterdir())
    prepare_output(work, "study", resume=resume, inputs=[world, args.physics, *args.deep_ensemble], flag="--work")
    if not resume:
        mark_output(work, "study")
    scale = climatological_std()
    pending = [(p, t) for p, t in units if not unit_path(work, p, t).is_file()]
    for plan in chosen:
        for note in plan.notes:
            log.info(note)
    with bar(total=len(units), initial=len(units) - len(pending), desc="study", unit="unit") as progress:
        for plan, init in pending:
            progress.set_postfix_str(f"{plan.name} {np.datetime_as_string(init, unit='h')}", refresh=False)
            run_unit(work, plan, init, truth, scale, args.seed)
            progress.update(1)
    costs: dict[str, dict[str, float] | None] = {plan.name: None for plan in chosen}
    if not args.no_cost:
        with bar(total=len(chosen), desc="cost pass", unit="system") as progress:
            for plan in chosen:
                costs[plan.name] = measure_cost(work, plan, inits[0])
                progress.update(1)
    records = {plan.name: [json.loads(unit_path(work, plan, t).read_text()) for t in inits] for plan in chosen}
    rows = [row for plan in chosen for row in aggregate(plan, records[plan.name], costs[plan.name])]
    if REFERENCE in records:
        rows += [row for plan in chosen if plan.name != REFERENCE
                 for row in paired_rows(plan, records[plan.name], records[REFERENCE])]
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.out)
    protocol = protocol_lines(args, chosen, inits)
    write_readme(table, args.readme, protocol)
    write_html(table, args.report, protocol, inputs=[str(args.out)])
    print(args.out)
    return 0


def _world_key(world: Path) -> str:
    """The world's cache key (its manifest), or its resolved path for a world without one, with its
    realization (:func:`common.realization`) unless it is the bundled analyses' own."""
    key = str(read_world_manifest(world).get("cache_key", world.resolve()))
    other = realization(world)
    return key if other is None else f"{key}/{other}"


def protocol_lines(args: argparse.Namespace, chosen: list[Plan], inits: np.ndarray) -> list[str]:
    """What was run, for the README and the report: inits, members, leads, machine and the command."""
    members = ", ".join(f"{p.name} {p.members}" for p in chosen)
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return [
        f"{len(inits)} inits from the analysis, {args.every_days} days apart "
        f"({np.datetime_as_string(inits[0], unit='h')} … {np.datetime_as_string(inits[-1], unit='h')}), verified against the truth",
        f"members: {members}",
        f"cost measured in this run's cost pass on one {platform.machine()} machine ({device}): each system's forecast of the "
        "first init run again back to back, wall seconds / (members × model steps)" if not args.no_cost else
        "no cost pass in this run (--no-cost): the tables have no cost",
        *[note for p in chosen for note in p.notes],
    ]


if __name__ == "__main__":
    sys.exit(main())
