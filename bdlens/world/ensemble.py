"""``bdlens world ensemble``: the perfect-model physics ensemble (SPEC §2).

Member j of the forecast from init time t_i restarts the dynamical core from the analysis state
(truth + δ_analysis(i)) perturbed once more with an independent draw δ_ens(i, j) of the *same*
analysis-error model. Since the truth is, seen from the analysis, just another draw of that model,
the members and the truth are exchangeable: the best-calibrated forecast the analysis allows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.progress import bar
from bdlens.world.analysis_error import ANALYSIS_STREAM, ENSEMBLE_STREAM, BalancedAnalysisError
from bdlens.world.build import read_manifest
from bdlens.world.config import WorldConfig
from bdlens.world.dycore import STATE_FIELDS, HeldSuarezCore
from bdlens.world.store import atomic_directory, fields_dataset

log = logging.getLogger(__name__)


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
    return indices


def physics_ensemble(
    world: str | Path,
    init_times: Sequence[str | np.datetime64],
    members: int,
    lead_hours: int,
    out: str | Path,
    overwrite: bool = False,
) -> Path:
    """Run the physics ensemble and write it as a bdlens forecast zarr.

    Output dims: ``number`` (members), ``time`` (inits), ``prediction_timedelta`` (0 … lead_hours every
    ``output_hours``), ``level``, ``latitude``, ``longitude``. Member j's perturbation depends only on
    (world seed, init, j), not on how many members are run.
    """
    world = Path(world)
    manifest = read_manifest(world)
    cfg = WorldConfig.model_validate(manifest["config"])
    if members < 2:
        raise BdlensError(f"--members must be at least 2 for an ensemble (got {members})")
    if lead_hours <= 0 or lead_hours % cfg.output_hours:
        raise BdlensError(f"--lead-hours must be a positive multiple of the world's {cfg.output_hours} h output step (got {lead_hours})")
    if not init_times:
        raise BdlensError("give at least one init time (--init 2000-01-05T00)")
    restart = xr.open_zarr(world / "restart.zarr")
    world_times = cfg.times()
    indices = _init_indices(world_times, restart.time.values, init_times)
    core = HeldSuarezCore(cfg)
    error = BalancedAnalysisError(core, cfg.analysis_error, cfg.seed)
    n_leads = lead_hours // cfg.output_hours + 1
    fields: dict[str, list[np.ndarray]] = {}
    with bar(total=len(indices) * members, desc="physics ensemble", unit="member") as progress:
        for index in indices:
            truth = {k: restart[k].sel(time=world_times[index]).values for k in STATE_FIELDS}
            analysis = error.perturb(truth, ANALYSIS_STREAM, index)
            per_member: dict[str, list[np.ndarray]] = {}
            for member in range(members):
                start = error.perturb(analysis, ENSEMBLE_STREAM, index, member)
                _, frames = core.trajectory(core.from_arrays(start), n_leads)
                for name, values in core.diagnose(frames).items():
                    per_member.setdefault(name, []).append(values)
                progress.update(1)
            for name, values in per_member.items():
                fields.setdefault(name, []).append(np.stack(values))
    stacked = {name: np.stack(values, axis=1) for name, values in fields.items()}  # (number, time, lead, ...)
    coords = {
        "number": np.arange(members),
        "time": world_times[indices],
        "prediction_timedelta": (np.arange(n_leads) * cfg.output_hours).astype("timedelta64[h]").astype("timedelta64[ns]"),
        "latitude": core.latitudes,
        "longitude": core.longitudes,
        "level": core.levels,
    }
    ds = fields_dataset(stacked, coords, ("number", "time", "prediction_timedelta"))
    ds.attrs.update(
        title="bdlens physics ensemble (perfect-model reference)",
        source=f"dinosaur Held-Suarez core restarted from perturbed analyses of world {manifest['cache_key']}",
        perturbation="analysis + independent draw of the world's balanced analysis-error model",
    )
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
    log.info("physics ensemble written to %s", out)
    return out
