"""Epistemic uncertainty from the bundled VI posteriors, through the Python API.

Builds (or reuses) a demo world, forecasts K posterior members from its analyses with the bundled
6 h and 24 h posteriors (hierarchical temporal aggregation, member k keeping weight sample k for the
whole rollout), scores them against the truth with ``bdlens.evaluate`` and saves a map of the
Z500 epistemic spread (the standard deviation across weight samples) at the longest lead.

    python examples/epistemic_spread.py [--world small] [--members 8] [--inits 2] [--lead-hours 6 24 48] [--map spread.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from bdlens.checkpoint import bundled_checkpoint  # noqa: E402
from bdlens.data import open_dataset  # noqa: E402
from bdlens.ensemble.rollout import posterior_forecast  # noqa: E402
from bdlens.evaluate import evaluate, to_table  # noqa: E402
from bdlens.models.pretrained import load_trained  # noqa: E402
from bdlens.world.build import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("small", "demo"), default="small", help="demo world to forecast (small: under a minute to build)")
    parser.add_argument("--members", type=int, default=8, help="K posterior weight samples")
    parser.add_argument("--inits", type=int, default=2, help="number of daily 00 UTC initial times")
    parser.add_argument("--lead-hours", type=int, nargs="+", default=[6, 24, 48])
    parser.add_argument("--map", type=Path, default=Path("epistemic_spread.png"), help="output PNG of the Z500 spread")
    args = parser.parse_args(argv)

    world = build(small=args.world == "small")
    analysis = open_dataset(world / "analysis.zarr").load()
    truth = open_dataset(world / "truth.zarr")
    layout = load_trained(bundled_checkpoint("det_6h")).layout  # variables, levels and grid of the bundled models
    # Two input times (t − 6 h, t) and a whole day of room before the first init.
    inits = analysis.time.values[4::4][: args.inits]
    posteriors = {6: bundled_checkpoint("vi_6h"), 24: bundled_checkpoint("vi_24h")}
    forecast = posterior_forecast(posteriors, layout, analysis, inits, args.lead_hours, members=args.members, seed=0)

    scores = to_table(evaluate({"vi": forecast[["geopotential", "temperature"]]}, truth[["geopotential", "temperature"]]))
    picked = scores[scores.level.isin([500, 850]) & scores.metric.isin(["crps", "rmse", "spread"]) & (scores.bin == "")]
    print(picked.pivot_table(index=["variable", "level", "lead_hours"], columns="metric", values="value").round(3).to_string())

    z500 = forecast.geopotential.sel(level=500).isel(prediction_timedelta=-1, time=0)
    spread = z500.std("number", ddof=1)
    fig, ax = plt.subplots(figsize=(8, 4))
    spread.plot(ax=ax, cmap="viridis", cbar_kwargs={"label": "Z500 spread across weight samples (m²/s²)"})
    lead = int(forecast.prediction_timedelta[-1] / 3.6e12)
    ax.set_title(f"epistemic spread, K = {args.members}, init {str(inits[0])[:13]}, +{lead} h")
    fig.savefig(args.map, dpi=100, bbox_inches="tight")
    print(f"Z500 spread at +{lead} h: mean {float(spread.mean()):.1f}, max {float(spread.max()):.1f} m²/s²; map: {args.map}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
