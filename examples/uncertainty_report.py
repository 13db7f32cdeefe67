"""Uncertainty maps and an HTML evaluation report through the Python API, on the small demo world.

Forecasts, with ``bdlens.Forecaster``, a K × J hybrid ensemble (K weight samples of the bundled
posteriors, each with J draws of the bundled system's perturbation, SPPT on every step) and a
posterior-only ensemble of the same size from the demo world's analyses, splits the Z500 spread of the hybrid into epistemic and aleatoric parts
with ``bdlens.uncertainty_maps``, saves the map panel and writes the report of both systems.

    python examples/uncertainty_report.py [--weight-samples 4] [--draws 3] [--inits 2] [--lead-hours 6 12 24] [--out uncertainty]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import bdlens
from bdlens.data import open_dataset
from bdlens.report.html import write_report
from bdlens.report.maps import plot_uncertainty
from bdlens.world.build import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-samples", type=int, default=4, help="K posterior weight samples")
    parser.add_argument("--draws", type=int, default=3, help="J perturbation draws per weight sample")
    parser.add_argument("--inits", type=int, default=2, help="number of daily 00 UTC initial times")
    parser.add_argument("--lead-hours", type=int, nargs="+", default=[6, 12, 24], help="leads: every multiple of the smallest up to the largest")
    parser.add_argument("--out", type=Path, default=Path("uncertainty"), help="output folder (map PNG and report/)")
    args = parser.parse_args(argv)

    world = build(small=True)
    analysis = open_dataset(world / "analysis.zarr").load()
    truth = open_dataset(world / "truth.zarr")
    inits = [str(t) for t in analysis.time.values[4::4][: args.inits]]
    k, j = args.weight_samples, args.draws
    forecaster = bdlens.Forecaster.from_pretrained()
    step = f"{min(args.lead_hours)}h"
    lead = f"{max(args.lead_hours)}h"
    hybrid = forecaster.ensemble(init=inits, members=k * j, weights=k, lead=lead, output_step=step, data=analysis,
                                 command="examples/uncertainty_report.py")
    posterior = forecaster.ensemble(init=inits, members=k * j, weights=k * j, lead=lead, output_step=step, perturbation="none",
                                    data=analysis, command="examples/uncertainty_report.py")

    maps = bdlens.uncertainty_maps(hybrid, variables=["geopotential"], levels=[500], thresholds={"geopotential": [55000.0]}).compute()
    z500 = {q: maps[f"geopotential_{q}"].sel(level=500) for q in ("total_std", "epistemic_std", "aleatoric_std", "epistemic_fraction")}
    identity = float(np.abs(z500["epistemic_std"] ** 2 + z500["aleatoric_std"] ** 2 - z500["total_std"] ** 2).max() / (z500["total_std"] ** 2).max())
    print(f"Z500, K = {k} weight samples x J = {j} draws; epistemic^2 + aleatoric^2 = total^2 to {identity:.1e} (relative)")
    for lead in z500["total_std"].prediction_timedelta.values:
        at = {q: float(da.sel(prediction_timedelta=lead).mean()) for q, da in z500.items()}
        print(
            f"  +{lead / np.timedelta64(1, 'h'):3.0f} h: total {at['total_std']:6.1f}, epistemic {at['epistemic_std']:6.1f}, "
            f"aleatoric {at['aleatoric_std']:6.1f} m2/s2; epistemic share {at['epistemic_fraction']:.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    plot_uncertainty(maps, "geopotential", level=500).savefig(args.out / "z500_uncertainty.png", dpi=100)
    report = write_report(
        {"hybrid": hybrid, "posterior": posterior}, truth, args.out / "report", fields=["geopotential:500", "temperature:850"], overwrite=True
    )
    print(f"map: {args.out / 'z500_uncertainty.png'}; report: {report / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
