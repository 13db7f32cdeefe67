"""``bdlens world ensemble``: members one after another (``member_batch=1``) vs one vmapped batch.

Small demo world (``bdlens.world.build.build(small=True)``, cached), one init. Two measurements:

1. integration + diagnosis of all members for each ``member_batch``, on one core whose compiled
   functions are reused (each setting is compiled once first, then timed best-of-N, interleaved so
   that load from other jobs hits every setting alike): the cost the batch size decides;
2. a whole ``physics_ensemble`` call, serial vs the largest batch, each after a warm-up call. Every
   call builds its own core and so compiles again: this column includes set-up, compile and write.

    OMP_NUM_THREADS=1 python benchmarks/bench_physics_ensemble.py [--members 8] [--lead-hours 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.world.analysis_error import ANALYSIS_STREAM, ENSEMBLE_STREAM, BalancedAnalysisError
from bdlens.world.build import build, read_manifest
from bdlens.world.config import WorldConfig
from bdlens.world.dycore import STATE_FIELDS, HeldSuarezCore
from bdlens.world.ensemble import member_forecasts, physics_ensemble

INIT = "2000-01-04T00"


def time_command(world: Path, members: int, lead_hours: int, batch: int, folder: Path) -> float:
    """Wall seconds of one whole ``physics_ensemble`` run (core set-up and compile included)."""
    start = time.perf_counter()
    physics_ensemble(world, [INIT], members, lead_hours, folder / f"b{batch}.zarr", overwrite=True, member_batch=batch)
    return time.perf_counter() - start


def time_integration(world: Path, members: int, lead_hours: int, batches: list[int], repeats: int) -> dict[int, float]:
    """Best-of-``repeats`` wall seconds to integrate and diagnose all members, compiled functions reused."""
    cfg = WorldConfig.model_validate(read_manifest(world)["config"])
    core = HeldSuarezCore(cfg)
    error = BalancedAnalysisError(core, cfg.analysis_error, cfg.seed)
    restart = xr.open_zarr(world / "restart.zarr")
    index = int(np.searchsorted(cfg.times(), np.datetime64(INIT, "ns")))
    analysis = error.perturb({k: restart[k].sel(time=np.datetime64(INIT, "ns")).values for k in STATE_FIELDS}, ANALYSIS_STREAM, index)
    starts = [error.perturb(analysis, ENSEMBLE_STREAM, index, j) for j in range(members)]
    n_leads = lead_hours // cfg.output_hours + 1

    def run(batch: int) -> None:
        for first in range(0, members, batch):
            member_forecasts(core, starts[first : first + batch], n_leads, batch)

    best = {}
    for batch in batches:
        run(batch)  # compile
    for _ in range(repeats):  # interleaved so that load from other jobs hits every setting alike
        for batch in batches:
            start = time.perf_counter()
            run(batch)
            best[batch] = min(best.get(batch, np.inf), time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--lead-hours", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    world = build(small=True)
    print(f"small world {world.name}: 1 init, {args.members} members × {args.lead_hours} h")

    integration = time_integration(world, args.members, args.lead_hours, args.batches, args.repeats)
    print(f"\nintegration + diagnosis, compiled (best of {args.repeats}):")
    for batch, seconds in integration.items():
        print(f"  member_batch={batch:<3d} {seconds:7.2f} s   ratio to serial {seconds / integration[1]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        whole = {}
        for batch in (1, max(args.batches)):
            time_command(world, args.members, args.lead_hours, batch, folder)  # warm-up
            whole[batch] = time_command(world, args.members, args.lead_hours, batch, folder)
    serial, batched = whole[1], whole[max(args.batches)]
    print("\nwhole physics_ensemble call (set-up, compile, write included):")
    print(f"  member_batch=1 {serial:.2f} s | member_batch={max(args.batches)} {batched:.2f} s | ratio batched/serial {batched / serial:.2f}")


if __name__ == "__main__":
    main()
