"""``bdlens world ensemble``: the perfect-model physics ensemble (docs/science.md §2).

Member j of the forecast from init time t_i restarts the dynamical core from the analysis state
(truth + δ_analysis(i)) perturbed once more with an independent draw δ_ens(i, j) of the *same*
analysis-error model. Since the truth is, seen from the analysis, just another draw of that model,
the members and the truth are exchangeable: the best-calibrated forecast the analysis allows.

Members of one init are integrated ``member_batch`` at a time as one vmapped trajectory, and the
output zarr is written init by init into a store whose layout is defined up front, so memory holds
one init's forecast (members × leads × fields), however many inits are run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import dask.array
import numpy as np
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.outputs import ZARR_LAYOUT, prepare_output
from bdlens.progress import bar
from bdlens.world.analysis_error import ANALYSIS_STREAM, ENSEMBLE_STREAM, BalancedAnalysisError
from bdlens.world.build import read_manifest
from bdlens.world.config import WorldConfig
from bdlens.world.dycore import STATE_FIELDS, HeldSuarezCore
from bdlens.world.store import atomic_directory, fields_dataset

log = logging.getLogger(__name__)

LEADING_DIMS = ("number", "time", "prediction_timedelta")
FORECAST_KIND = "forecast store"


def _init_indices(world_times: np.ndarray, restart_times: np.ndarray, init_times: Sequence[str | np.datetime64]) -> list[int]:
    """Positions of ``init_times`` in the world's output times; each must be a restart time."""
    indices = []
    for value in init_times:
        try:
            t = np.datetime64(value, "ns")
        except ValueError as err:
            raise BdlensError(f"init time {value!r} is not an ISO date such as 2000-01-05T00") from err
        if t not in restart_times:
            raise BdlensError(
                f"init time {np.datetime_as_string(t, unit='h')} is not a restart time of this world "
                f"({np.datetime_as_string(restart_times[0], unit='h')} … {np.datetime_as_string(restart_times[-1], unit='h')}, "
                f"every {int((restart_times[1] - restart_times[0]) / np.timedelta64(1, 'h')) if restart_times.size > 1 else 0} h)"
            )
        indices.append(int(np.searchsorted(world_times, t)))
    if len(set(indices)) < len(indices):
        repeated = sorted({np.datetime_as_string(world_times[i], unit="h") for i in indices if indices.count(i) > 1})
        raise BdlensError(f"init time(s) {', '.join(repeated)} given more than once; give each --init once")
    return indices


def member_forecasts(core: HeldSuarezCore, starts: list[dict[str, np.ndarray]], n_leads: int, batch: int) -> dict[str, np.ndarray]:
    """WB2 fields (SI units) of the trajectories from ``starts`` (model-state arrays, at most ``batch``).

    With ``batch`` > 1 the members are integrated as one vmapped trajectory of ``batch`` lanes; fewer
    starts are padded with copies of the first (dropped afterwards), so that a run compiles for one
    batch shape only. Returns arrays of shape (len(starts), n_leads, level, lat, lon) or
    (len(starts), n_leads, lat, lon).
    """
    if batch == 1:
        (start,) = starts
        _, frames = core.trajectory(core.from_arrays(start), n_leads)
        return {name: values[None] for name, values in core.diagnose(frames).items()}
    import jax

    padded = starts + starts[:1] * (batch - len(starts))
    stacked = core.from_arrays({name: np.stack([start[name] for start in padded]) for name in STATE_FIELDS})
    _, frames = core.trajectory(stacked, n_leads, batched=True)
    # Members and leads flattened into one axis: a single diagnosis call per batch.
    flat = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), frames)
    fields = core.diagnose(flat)
    return {name: values.reshape(batch, n_leads, *values.shape[1:])[: len(starts)] for name, values in fields.items()}


def _template(coords: dict[str, np.ndarray], fields: dict[str, np.ndarray]) -> xr.Dataset:
    """The whole output as lazy zeros, one chunk per init, so that each init is written as a region."""
    shape = {name: len(values) for name, values in coords.items()}
    lazy = {}
    for name, values in fields.items():
        dims = LEADING_DIMS + (("level",) if values.ndim == 5 else ()) + ("latitude", "longitude")
        sizes = tuple(shape[d] for d in dims)
        lazy[name] = dask.array.zeros(sizes, dtype=np.float32, chunks=tuple(1 if d == "time" else n for d, n in zip(dims, sizes)))
    return fields_dataset(lazy, coords, LEADING_DIMS)


def physics_ensemble(
    world: str | Path,
    init_times: Sequence[str | np.datetime64],
    members: int,
    lead_hours: int,
    out: str | Path,
    overwrite: bool = False,
    member_batch: int = 1,
) -> Path:
    """Run the physics ensemble and write it as a bdlens forecast zarr (v2, consolidated).

    Output dims: ``number`` (members), ``time`` (inits), ``prediction_timedelta`` (0 … lead_hours every
    ``output_hours``), ``level``, ``latitude``, ``longitude``; WB2 variable names, SI units, float32,
    one zarr chunk per init. Member j's perturbation depends only on (world seed, init, j), not on
    how many members are run or how they are batched.

    ``member_batch`` members are integrated together as one vmapped trajectory. Batching changes
    results only by float32 round-off (at 12 h leads ≤ 1e-5 of each field's largest magnitude; the
    chaotic flow lets such differences grow with lead like any other). The default of 1 is the
    fastest on CPU: on the 2-core development machine a batch of 8 integrated 8 members in ≈1.4× the
    time of 8 single runs (no arithmetic is saved and the working set grows; benchmarks/bench_physics_ensemble.py),
    so larger batches are for accelerator backends.
    """
    world, out = Path(world), Path(out)
    prepare_output(out, FORECAST_KIND, overwrite, inputs=[world], layout=ZARR_LAYOUT, clear=False)  # before anything is read or run
    manifest = read_manifest(world)
    cfg = WorldConfig.model_validate(manifest["config"])
    if members < 2:
        raise BdlensError(f"--members must be at least 2 for an ensemble (got {members})")
    if member_batch < 1:
        raise BdlensError(f"--member-batch must be at least 1 (got {member_batch})")
    if lead_hours <= 0 or lead_hours % cfg.output_hours:
        raise BdlensError(f"--lead-hours must be a positive multiple of the world's {cfg.output_hours} h output step (got {lead_hours})")
    if not init_times:
        raise BdlensError("give at least one init time (--init 2000-01-05T00)")
    restart = xr.open_zarr(world / "restart.zarr")
    world_times = cfg.times()
    indices = _init_indices(world_times, restart.time.values, init_times)
    # The grid exactly as the world's truth has it (recomputing it can differ in the last bit), so
    # that the forecast aligns with the truth in plain xarray.
    grid = xr.open_zarr(world / "truth.zarr")
    n_leads = lead_hours // cfg.output_hours + 1
    batch = min(member_batch, members)  # no more lanes than members
    coords = {
        "number": np.arange(members),
        "time": world_times[indices],
        "prediction_timedelta": (np.arange(n_leads) * cfg.output_hours).astype("timedelta64[h]").astype("timedelta64[ns]"),
        "latitude": grid["latitude"].values,
        "longitude": grid["longitude"].values,
        "level": grid["level"].values,
    }
    core = HeldSuarezCore(cfg)
    error = BalancedAnalysisError(core, cfg.analysis_error, cfg.seed)
    # Forecast stores are opaque zarr: only a marked one is replaced (an unmarked one may be the user's).
    with atomic_directory(out, FORECAST_KIND, overwrite=overwrite, inputs=[world]) as tmp, \
            bar(total=len(indices) * members, desc="physics ensemble", unit="member") as progress:
        for position, index in enumerate(indices):
            truth = {k: restart[k].sel(time=world_times[index]).values for k in STATE_FIELDS}
            analysis = error.perturb(truth, ANALYSIS_STREAM, index)
            fields: dict[str, np.ndarray] = {}
            for first in range(0, members, batch):
                chunk = range(first, min(first + batch, members))
                starts = [error.perturb(analysis, ENSEMBLE_STREAM, index, member) for member in chunk]
                for name, values in member_forecasts(core, starts, n_leads, batch).items():
                    fields.setdefault(name, np.empty((members, *values.shape[1:]), np.float32))[first : first + len(chunk)] = values
                progress.update(len(chunk))
            if position == 0:
                ds = _template(coords, fields)
                ds.attrs.update(
                    title="bdlens physics ensemble (perfect-model reference)",
                    source=f"dinosaur Held-Suarez core restarted from perturbed analyses of world {manifest['cache_key']}",
                    perturbation="analysis + independent draw of the world's balanced analysis-error model",
                )
                # Every coordinate chunk on disk: a single init's time encodes as 0, the fill value, which zarr
                # would otherwise leave unwritten (and the canonical reader refuses as a missing chunk).
                ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True, compute=False, write_empty_chunks=True)
            region = xr.Dataset({name: (ds[name].dims, values[:, None]) for name, values in fields.items()})
            region.to_zarr(tmp, region={"time": slice(position, position + 1)}, zarr_format=2)
    log.info("physics ensemble written to %s", out)
    return out
