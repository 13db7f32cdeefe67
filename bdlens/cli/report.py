"""``bdlens report``: a self-contained HTML evaluation report of several systems, plus CSV tables."""

from __future__ import annotations

import argparse
import logging

from bdlens.cli.options import add_scoring_options, dask_scheduler
from bdlens.errors import BdlensError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report",
        help="HTML evaluation report: skill vs lead, rank histograms, reliability, spectra, decomposition, checks, cost",
        description=(
            "Score every forecast system against TRUTH on the init times they share and write DIR/report.html (one "
            "self-contained page, figures embedded) with the tables scores.csv, checks.csv, cost.csv and provenance.csv. "
            "A forecast without member dimension is scored as deterministic. See docs/reports.md."
        ),
    )
    parser.add_argument(
        "--forecasts", nargs="+", required=True, metavar="NAME=PATH", help="forecast stores (zarr or netCDF), each named for the legend"
    )
    parser.add_argument("--truth", required=True, help="truth store (zarr or netCDF) on the forecasts' grid")
    parser.add_argument("--out", required=True, help="output directory of the report (created; must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier bdlens report")
    parser.add_argument(
        "--fields", nargs="+", metavar="VARIABLE[:LEVEL]", help="fields to report, e.g. geopotential:500 2m_temperature (default: Z500, T850, T2m)"
    )
    add_scoring_options(parser)
    parser.set_defaults(func=run)


def parse_forecasts(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items as {name: path}; a one-line error for a missing ``=`` or a repeated name."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BdlensError(f"--forecasts {item!r}: write NAME=PATH, e.g. hybrid=runs/hybrid.zarr")
        if name in named:
            raise BdlensError(f"--forecasts: the name {name!r} is given twice; give each system its own name")
        named[name] = path
    return named


def run(args: argparse.Namespace) -> int:
    """Handler of ``bdlens report``; returns the exit code."""
    from bdlens.evaluate import DEFAULT_QUANTILES
    from bdlens.report.html import write_report

    forecasts = parse_forecasts(args.forecasts)
    with dask_scheduler(args.scheduler):
        out = write_report(
            forecasts,
            args.truth,
            args.out,
            fields=args.fields,
            member_dim=args.member_dim,
            quantiles=args.quantiles or DEFAULT_QUANTILES,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(out / "report.html")
    return 0
