"""Export a few analysis states of a world, e.g. the bundled demo analyses that `bdlens ensemble` starts from.

For each init time the state at the init and the states ``history_hours`` before it (the second
input time of each step model and the start of the bred vectors' breeding window: 6, 24 and 30 h for the bundled demo) are written, float32, as a
WB2-layout zarr (v2) whose attributes say which world, inits and command made it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bdlens.data import open_dataset
from bdlens.errors import BdlensError
from bdlens.world.build import read_manifest
from bdlens.world.store import coordinate_attrs

BUNDLED_ANALYSIS = Path(__file__).resolve().parent.parent / "assets" / "analysis" / "demo_analysis.zarr"


def export_analysis(world: Path, inits: Sequence[str], history_hours: Sequence[int], out: Path, command: str,
                    overwrite: bool = False) -> Path:
    """Write the analyses of ``world`` at ``inits`` and ``history_hours`` before each to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BdlensError(f"{out} exists; pass --overwrite to replace it")
    analysis = open_dataset(world / "analysis.zarr")
    init_times = np.asarray([np.datetime64(t, "ns") for t in inits])
    offsets = sorted({0, *(-abs(int(h)) for h in history_hours)})
    times = np.unique((init_times[:, None] + np.asarray(offsets, "timedelta64[h]")[None, :]).ravel())
    missing = np.setdiff1d(times, analysis.time.values)
    if missing.size:
        raise BdlensError(f"the world has no analysis at {np.datetime_as_string(missing[0], unit='h')}; choose other --init times")
    manifest = read_manifest(world)
    ds = coordinate_attrs(analysis.sel(time=times).astype(np.float32).load())
    ds.attrs = {"source": f"analysis of the bdlens demo world {world.name}", "world_config": str(manifest.get("config", "")),
                "inits": [np.datetime_as_string(t, unit="h") for t in init_times], "command": command}
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.chunk({"time": 1}).to_zarr(tmp, zarr_format=2, consolidated=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
