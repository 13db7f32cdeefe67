"""Out-of-core ``bdlens evaluate``: a forecast store several times larger than the dask worker memory.

Writes a random forecast zarr (float32, WB2 64×32 grid; chunks of one initialisation with all
members, leads and levels) and a matching truth, starts a one-worker ``LocalCluster`` with a hard
``memory_limit``, runs ``bdlens evaluate --scheduler`` on it and reports the store size, the limit
and the worker's peak process memory (distributed's MemorySampler).

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate_memory.py [--inits 600] [--memory-limit 600MB]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array
import numpy as np
import pandas as pd
import xarray as xr
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster
from distributed.diagnostics import MemorySampler

from bdlens import grid
from bdlens.cli import main as bdlens_main

LEVELS = [500, 850]


def build_stores(folder: Path, members: int, n_inits: int, n_leads: int, seed: int) -> tuple[Path, Path, int]:
    """Write truth and forecast zarr stores chunk by chunk; returns their paths and the forecast bytes."""
    g = grid.GRIDS["64x32"]
    inits = pd.date_range("2000-01-01", periods=n_inits, freq="6h")
    leads = pd.to_timedelta(6 * np.arange(1, n_leads + 1), unit="h")
    times = pd.date_range(inits[0], inits[-1] + leads[-1], freq="6h")
    horizontal = {"latitude": g.latitudes(), "longitude": g.longitudes()}
    rng = dask.array.random.default_rng(seed)
    truth_shape = (times.size, len(LEVELS), g.nlat, g.nlon)
    truth = xr.Dataset(
        {"temperature": (("time", "level", "latitude", "longitude"), 250 + rng.standard_normal(truth_shape, chunks=(64, -1, -1, -1), dtype=np.float32))},
        coords={"time": times, "level": LEVELS, **horizontal},
    )
    shape = (members, n_inits, n_leads, len(LEVELS), g.nlat, g.nlon)
    noise = rng.standard_normal(shape, chunks=(-1, 1, -1, -1, -1, -1), dtype=np.float32)
    forecast = xr.Dataset(
        {"temperature": (("number", "time", "prediction_timedelta", "level", "latitude", "longitude"), 250 + noise)},
        coords={"time": inits, "prediction_timedelta": leads, "level": LEVELS, **horizontal},
    )
    truth_path, forecast_path = folder / "truth.zarr", folder / "forecast.zarr"
    with dask.config.set(scheduler="threads"):
        truth.to_zarr(truth_path, mode="w", consolidated=False)
        forecast.to_zarr(forecast_path, mode="w", consolidated=False)
    return truth_path, forecast_path, forecast["temperature"].nbytes


def disk_size(path: Path) -> int:
    """Bytes on disk of a directory tree."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--inits", type=int, default=600)
    parser.add_argument("--leads", type=int, default=4)
    parser.add_argument("--memory-limit", default="600MB", help="dask worker memory limit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="folder for the stores (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="bdlens-bench-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        truth_path, forecast_path, nbytes = build_stores(folder, args.members, args.inits, args.leads, seed=0)
        limit = parse_bytes(args.memory_limit)
        print(f"forecast: {args.members} members x {args.inits} inits x {args.leads} leads x {len(LEVELS)} levels x 32 x 64 float32")
        print(f"forecast size: {format_bytes(nbytes)} in memory, {format_bytes(disk_size(forecast_path))} on disk "
              f"(built in {time.perf_counter() - start:.0f} s)")
        print(f"worker memory limit: {format_bytes(limit)} (1 worker, {args.threads} threads): forecast = {nbytes / limit:.1f}x the limit")
        out = folder / "metrics.nc"
        with (
            LocalCluster(n_workers=1, threads_per_worker=args.threads, memory_limit=limit, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            sampler = MemorySampler()
            start = time.perf_counter()
            with sampler.sample("evaluate", client=client, measure="process", interval=0.25):
                rc = bdlens_main(["-q", "evaluate", str(forecast_path), "--truth", str(truth_path), "--out", str(out),
                                  "--scheduler", cluster.scheduler_address])
            seconds = time.perf_counter() - start
            samples = sampler.to_pandas()["evaluate"]
        peak = samples.max()
        print(f"bdlens evaluate exit code {rc} in {seconds:.0f} s; worker process memory at start {format_bytes(samples.iloc[0])}, "
              f"peak {format_bytes(peak)} ({peak / limit:.0%} of the limit; forecast = {nbytes / peak:.1f}x the peak)")
        if rc == 0:
            result = xr.open_dataset(out, decode_timedelta=True)
            print(result["temperature"].sel(forecast="forecast", metric=["crps", "rmse", "spread_skill_corrected"]).isel(level=0).to_pandas())
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
