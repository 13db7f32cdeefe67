"""``bdlens evaluate``: score ensemble forecasts against a truth store (docs/science.md §7)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bdlens.cli.options import add_scoring_options, dask_scheduler

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score ensemble forecasts: CRPS, RMSE, spread-skill, rank histograms, Brier, ...",
        description=(
            "Score each FORECAST (zarr or netCDF, dims number, time, prediction_timedelta, [level], latitude, "
            "longitude) against TRUTH at valid time = time + prediction_timedelta. Metrics are averaged over "
            "initialisation time and area (cell-area weights) per variable, level and lead. Runs out of core "
            "with dask; --scheduler sends the work to a dask.distributed cluster."
        ),
    )
    parser.add_argument("forecasts", nargs="+", metavar="FORECAST", help="forecast store(s); named by their file stem")
    parser.add_argument("--truth", required=True, help="truth store (zarr or netCDF) with the same grid and variables")
    parser.add_argument("--out", help="write metrics to this .nc (all diagnostics) or .csv (long table); default: print a summary")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a metrics file bdlens wrote")
    parser.add_argument("--variables", nargs="+", help="variables to score (default: all variables of each forecast)")
    parser.add_argument("--climatology", help="store with the climatology for ACC (default: the truth's time mean)")
    add_scoring_options(parser)
    parser.set_defaults(func=run)


def _names(paths: list[str]) -> list[str]:
    """Forecast names from the file stems, made unique with a suffix when two stems clash."""
    names: list[str] = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    """Handler of ``bdlens evaluate``; returns the exit code."""
    from bdlens import evaluate

    if args.out:
        evaluate.check_output_path(args.out, args.overwrite, inputs=[*args.forecasts, args.truth, args.climatology])
    truth = evaluate.open_data(args.truth)
    # The reader renames the member dimension to `number` (member and realization without being told).
    forecasts = {name: evaluate.open_data(path, args.member_dim) for name, path in zip(_names(args.forecasts), args.forecasts, strict=True)}
    climatology = evaluate.open_data(args.climatology) if args.climatology else None
    with dask_scheduler(args.scheduler):
        result = evaluate.evaluate(
            forecasts,
            truth,
            member_dim="number",
            variables=args.variables,
            climatology=climatology,
            quantiles=args.quantiles or evaluate.DEFAULT_QUANTILES,
            seed=args.seed,
        )
    if args.out:
        path = evaluate.write(result, args.out, overwrite=args.overwrite)
        log.info("wrote %s", path)
    else:
        table = evaluate.to_table(result)
        headline = table[table["metric"].isin(["crps", "rmse", "spread_skill_corrected"])].fillna({"level": "surface"})
        print(headline.pivot_table(index=["forecast", "variable", "level", "lead_hours"], columns="metric", values="value").to_string())
    return 0
