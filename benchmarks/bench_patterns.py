"""Time per step of the SPPT random pattern (bdlens.perturbation.patterns) for 100 members.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_patterns.py [--device cuda] [--members 100]``.
For each grid it times one pattern step (AR(1) update incl. the per-member noise draws) plus the
grid-point synthesis, and reports the split between the two and the ratio between grids, all
measured side by side in the same process.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from bdlens.perturbation.patterns import SphericalPattern, UnresolvedScaleWarning


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--grids", nargs="+", default=["64x32", "240x121"])
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for grid in args.grids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnresolvedScaleWarning)
            pattern = SphericalPattern(grid, device=device)
        state = pattern.init(0, args.members)
        step = _time(lambda: pattern.step(state), device, args.repeats)  # noqa: B023
        field = _time(lambda: pattern.field(state), device, args.repeats)  # noqa: B023
        results[grid] = step + field
        print(
            f"{grid:>9} on {device}: {args.members} members, truncation {pattern.truncations}: "
            f"step {1e3 * step:7.2f} ms + field {1e3 * field:7.2f} ms = {1e3 * (step + field):7.2f} ms per step "
            f"({1e6 * (step + field) / args.members:6.1f} µs per member-step; noise+AR(1) share {step / (step + field):.0%})"
        )
    grids = list(results)
    for other in grids[1:]:
        print(f"ratio {other} / {grids[0]}: {results[other] / results[grids[0]]:.2f}")


if __name__ == "__main__":
    main()
