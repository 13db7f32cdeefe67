"""Speed of the data layer on a demo-world-shaped synthetic store (64×32, 8 levels, 4+4 variables),
or on the small demo world (``--world small``, built or reused from the cache).

Prints, side by side: opening the store, computing normalisation statistics, loading the split into
memory, and one epoch of DataLoader batches from the lazy (read per sample) and in-memory datasets,
with the epoch-time ratio lazy / in-memory; then the trainers' batch loader
(:class:`bdlens.training.batches.BatchLoader`: the seeded batches of ``--steps`` optimiser steps)
with 0, 1 and 2 worker processes, in samples per second, from the lazy (zarr-backed) and in-memory
datasets (worker start-up included: it is paid once per run and once per resume).

    OMP_NUM_THREADS=2 python benchmarks/bench_data.py [--days 60] [--batch 8] [--world small]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import DEMO_LEVELS, SURFACE, UPPER, write_synthetic  # noqa: E402

from bdlens.data import FieldLayout, WeatherDataset, compute_stats, open_dataset, resolve_data_path  # noqa: E402
from bdlens.training.batches import BatchLoader, seeded_batch  # noqa: E402
from bdlens.training.distributed import Distributed  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _epoch(data: WeatherDataset, batch: int) -> float:
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loader_throughput(data: WeatherDataset, batch: int, steps: int, workers: int) -> float:
    """Samples per second of ``steps`` seeded batches made by a BatchLoader with ``workers`` processes."""
    make = partial(seeded_batch, dataset=data, batch_size=batch, seed=0, dist_info=Distributed(), input_times=data.input_steps)
    loader = BatchLoader(make, steps, workers, torch.device("cpu"))
    start = time.perf_counter()
    for step in range(steps):
        loader(step)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=60, help="days of 6-hourly data (default 60)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of the batch-loader throughput (default 40)")
    parser.add_argument("--world", choices=("small",), help="the small demo world's truth instead of a synthetic store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.world:
            path = resolve_data_path(args.world)
        else:
            path = write_synthetic(
                Path(tmp) / "truth.zarr", times=4 * args.days, levels=DEMO_LEVELS, upper_variables=UPPER, surface_variables=SURFACE,
                zarr_format=2,
            )
        ds, t_open = _timed(lambda: open_dataset(path))
        stats, t_stats = _timed(lambda: compute_stats(ds))
        layout = FieldLayout.from_dataset(ds)
        lazy, _ = _timed(lambda: WeatherDataset(ds, layout, "6h", stats=stats))
        memory, t_load = _timed(lambda: WeatherDataset(ds, layout, "6h", stats=stats, in_memory=True))
        t_lazy, t_memory = _epoch(lazy, args.batch), _epoch(memory, args.batch)
        throughput = {(kind, workers): loader_throughput(data, args.batch, args.steps, workers)
                      for workers in (0, 1, 2) for kind, data in (("lazy", lazy), ("in memory", memory))}
    channels = len(layout.upper_variables) * len(layout.levels) + len(layout.surface_variables)
    mb = 4 * ds.sizes["time"] * channels * ds.sizes["latitude"] * ds.sizes["longitude"] / 2**20
    print(f"store: {path if args.world else 'synthetic'}, {ds.sizes['time']} times, {mb:.0f} MB float32; {len(memory)} samples, batch {args.batch}")
    print(f"open_dataset        {t_open * 1e3:8.1f} ms")
    print(f"compute_stats       {t_stats * 1e3:8.1f} ms")
    print(f"load split (memory) {t_load * 1e3:8.1f} ms")
    print(f"epoch lazy          {t_lazy * 1e3:8.1f} ms  ({t_lazy / len(lazy) * 1e3:.2f} ms/sample)")
    print(f"epoch in memory     {t_memory * 1e3:8.1f} ms  ({t_memory / len(memory) * 1e3:.3f} ms/sample)")
    print(f"ratio lazy / in-memory epoch: {t_lazy / t_memory:.1f}x")
    print(f"batch loader, {args.steps} steps of {args.batch} (samples/s): workers      0        1        2")
    for kind in ("lazy", "in memory"):
        print(f"  {kind:<52} " + " ".join(f"{throughput[kind, w]:8.0f}" for w in (0, 1, 2)))


if __name__ == "__main__":
    main()
