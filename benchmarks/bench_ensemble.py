"""Cost of `bdlens ensemble` on this machine, for the bundled demo system and analyses.

1. Wall time and peak RSS of a 100-member 10-day ensemble (the README's main job), and peak RSS at
   2, 5 and 10 days: each in its own process (`bdlens ensemble`), peak RSS from getrusage of the
   child. Flat RSS across leads shows that memory does not grow with the rollout.
2. Cost per member-step of each system's 10-day rollout relative to the deterministic 3DEST's on the
   same batch of members and the same inputs (goal for the hybrid: ≤ 1.3×), timed in alternation,
   best of ``--repeats``, for each number J of perturbation draws per weight sample in ``--draws``
   (default: the J of `bdlens ensemble --members MEMBERS`, from the system's ``default_weights``, and
   J = 10). A batch of B members then holds B / J distinct weight samples, and the posterior's cost
   grows with that number: each sample's weights are read for its own members.

    OMP_NUM_THREADS=2 python benchmarks/bench_ensemble.py [--members 100] [--batch 20] [--repeats 5] [--draws J ...] [--skip-runs]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xarray as xr

from bdlens.data import open_dataset
from bdlens.data.export import BUNDLED_ANALYSIS
from bdlens.ensemble import Forecaster
from bdlens.ensemble.design import Design
from bdlens.ensemble.engine import _source_layout
from bdlens.ensemble.rollout import history_offsets, initial_states, member_states

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402


def timed_run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `bdlens ensemble` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bdlens", "-q", "ensemble", *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024


def step_costs(forecaster: Forecaster, analysis: xr.Dataset, batch: int, repeats: int, draws: int) -> dict[str, float]:
    """Seconds per member-step of a 10-day rollout (10 × 24 h steps) of each system for one batch of
    ``batch`` members, J = ``draws`` perturbation draws per weight sample (``batch / draws`` weight samples
    in the batch), from the last init of ``analysis``: weight sampling, perturbation draws and every
    network call included."""
    init = analysis.time.values[-1:]
    leads = list(range(24, 241, 24))
    systems = {
        "deterministic": (False, "none", 1),
        "epistemic (posterior)": (True, "none", max(1, batch // draws)),
        "aleatoric (deterministic + sppt)": (False, "sppt", 1),
        "hybrid (posterior + sppt)": (True, "sppt", max(1, batch // draws)),
    }
    runs = {}
    for name, (bayes, scheme, weights) in systems.items():
        source, _ = forecaster.source(Design.of(batch, weights), scheme, bayes, seed=0)
        history = initial_states(analysis, _source_layout(source), init, history_offsets(source))

        def rollout(source=source, history=history) -> None:
            for _ in member_states(source, history, 0, range(batch), leads):
                pass

        runs[name] = rollout
    seconds = interleaved(runs, repeats)
    return {name: s / (batch * len(leads)) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20, help="members per batch for the step costs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, nargs="+", help="J per weight sample (default: `bdlens ensemble`'s for --members, and 10)")
    parser.add_argument("--skip-runs", action="store_true", help="only the step costs")
    args = parser.parse_args(argv)
    forecaster = Forecaster.from_pretrained(device="cpu")
    draws = args.draws or sorted({args.members // forecaster.default_weights(args.members, bayes=True), 10})
    if any(j < 1 or args.batch % j for j in draws):
        parser.error(f"every --draws must divide --batch {args.batch}, got {draws}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.skip_runs:
        print("| run | wall s | peak RSS MiB |\n|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for lead in ("2d", "5d", "10d"):
                wall, rss = timed_run(["--members", str(args.members), "--lead", lead, "--out", f"{tmp}/{lead}.zarr"])
                print(f"| {args.members} members, {lead} | {wall:.1f} | {rss:.0f} |")
    print(f"\n| system (10 d of 24 h steps, batch {args.batch}) | J | ms per member-step | × deterministic |\n|---|---|---|---|")
    analysis = open_dataset(BUNDLED_ANALYSIS, sparse_times=True).load()
    for j in draws:
        costs = step_costs(forecaster, analysis, args.batch, args.repeats, j)
        base = costs["deterministic"]
        for name, cost in costs.items():
            print(f"| {name} | {j} | {1e3 * cost:.2f} | {cost / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
