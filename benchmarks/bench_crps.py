"""Pointwise ensemble CRPS: bdlens vs properscoring (numba), xskillscore and scores, side by side.

Array: M members × 365 times × 32 × 64 (the WB2 64×32 grid), float64, member dim first as in
forecast files; every library returns the 365 × 32 × 64 pointwise scores. Times are the best of
``--repeat`` runs in this process, one thread. Then the memory per point of the bdlens kernel
(tracemalloc peak) for M = 50 and 100 against an O(M²) pairwise evaluation on a small slice.

    OMP_NUM_THREADS=1 python benchmarks/bench_crps.py [--members 50 100] [--times 365] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import properscoring  # noqa: E402
import scores.probability  # noqa: E402
import xarray as xr  # noqa: E402
import xskillscore  # noqa: E402

from bdlens.metrics import crps  # noqa: E402
from bdlens.metrics.crps import crps_ensemble_numpy  # noqa: E402


def best_time(fn, repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time over ``repeat`` calls and the (computed) result of the last one."""
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = np.asarray(fn())
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(members: int, n_times: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    dims = ("number", "time", "latitude", "longitude")
    # Rounded to 0.01 so that ties occur, as in real low-precision fields.
    x = np.round(rng.normal(size=(members, n_times, 32, 64)), 2)
    y = np.round(rng.normal(size=(n_times, 32, 64)), 2)
    forecast, truth = xr.DataArray(x, dims=dims), xr.DataArray(y, dims=dims[1:])
    print(f"\nM = {members}: forecast {x.nbytes / 2**20:.0f} MiB, {y.size} points")
    runs = {
        "bdlens fair": lambda: crps(forecast, truth, dims=()).values,
        "bdlens standard": lambda: crps(forecast, truth, dims=(), fair=False).values,
        "properscoring (numba), standard": lambda: properscoring.crps_ensemble(y, x, axis=0),
        "xskillscore, standard": lambda: xskillscore.crps_ensemble(truth, forecast, member_dim="number", dim=[]).values,
        "scores fair": lambda: scores.probability.crps_for_ensemble(forecast, truth, "number", method="fair", preserve_dims="all")
        .transpose(*dims[1:])
        .values,
        "scores ecdf": lambda: scores.probability.crps_for_ensemble(forecast, truth, "number", method="ecdf", preserve_dims="all")
        .transpose(*dims[1:])
        .values,
    }
    results = {name: best_time(fn, repeat) for name, fn in runs.items()}
    reference = {"fair": results["bdlens fair"], "standard": results["bdlens standard"]}
    print(f"{'method':34s} {'time [s]':>9s} {'vs bdlens':>10s} {'max rel. diff':>14s}")
    for name, (seconds, values) in results.items():
        kind = "fair" if "fair" in name else "standard"
        ours_seconds, ours = reference[kind]
        diff = np.max(np.abs(values - ours) / np.maximum(np.abs(ours), 1e-300))
        print(f"{name:34s} {seconds:9.3f} {seconds / ours_seconds:9.2f}x {diff:14.2e}")


def memory_per_point(members: int, points: int = 20_000) -> tuple[float, float]:
    """tracemalloc peak bytes per point: the bdlens kernel and an O(M²) pairwise evaluation."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(points, members))
    y = rng.normal(size=points)
    peaks = []
    for fn in (lambda: crps_ensemble_numpy(x, y), lambda: np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2))):
        tracemalloc.start()
        fn()
        peaks.append(tracemalloc.get_traced_memory()[1] / points)
        tracemalloc.stop()
    return peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--times", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; best of {args.repeat}; pointwise CRPS on {args.times}x32x64")
    for members in args.members:
        bench(members, args.times, args.repeat)
    print("\nmemory per point (tracemalloc peak, float64 input of 8·M bytes per point)")
    print(f"{'M':>4s} {'bdlens [B/pt]':>14s} {'per member':>11s} {'pairwise O(M^2) [B/pt]':>23s}")
    for members in args.members:
        ours, pairwise = memory_per_point(members)
        print(f"{members:4d} {ours:14.0f} {ours / members:11.1f} {pairwise:23.0f}")


if __name__ == "__main__":
    main()
