"""``bdlens world``: build the demo world, summarise it, run the physics ensemble."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bdlens world {build,summary,ensemble,export-analysis}``."""
    world = subparsers.add_parser("world", help="the embedded demo world (Held-Suarez dynamical core)")
    commands = world.add_subparsers(dest="world_command", metavar="COMMAND", required=True)

    build = commands.add_parser("build", help="build (or reuse from the cache) a demo world and print its summary")
    preset = build.add_mutually_exclusive_group()
    preset.add_argument("--small", action="store_true", help="a few weeks, for tests and the quick start (<1 min)")
    preset.add_argument("--config", help="world YAML (path or name in configs/); default: configs/world_demo.yaml")
    build.add_argument("--cache-dir", type=Path, help="where worlds are cached (default $BDLENS_CACHE_DIR or ~/.cache/bdlens)")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached world with these settings exists")
    build.set_defaults(func=_build)

    summary = commands.add_parser("summary", help="print the summary of a built world")
    summary.add_argument("world", type=Path, help="world directory printed by `bdlens world build`")
    summary.set_defaults(func=_summary)

    ens = commands.add_parser(
        "ensemble",
        help="run the perfect-model physics ensemble from perturbed analyses",
        description="Restart the world's dynamical core from perturbed analyses at each --init and write the members' "
        "forecasts (dims number, time, prediction_timedelta, level, latitude, longitude) to a zarr, one init at a time.",
    )
    ens.add_argument("--world", type=Path, required=True, help="world directory printed by `bdlens world build`")
    ens.add_argument("--init", dest="init_times", action="append", required=True, metavar="TIME",
                     help="init time, ISO (e.g. 2000-01-05T00); repeat for several")
    ens.add_argument("--members", type=int, default=10, help="ensemble members (default 10)")
    ens.add_argument("--lead-hours", type=int, default=120, help="forecast length in hours (default 120)")
    ens.add_argument("--member-batch", type=int, default=1, metavar="N",
                     help="members integrated together as one vmapped batch (default 1, the fastest on CPU; "
                          "results differ only by float32 round-off)")
    ens.add_argument("--out", type=Path, required=True, help="output zarr (bdlens forecast layout), written init by init")
    ens.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ens.set_defaults(func=_ensemble)

    export = commands.add_parser(
        "export-analysis",
        help="write the analyses at some init times (and the history the step models need) to a small zarr",
        description="Export analysis states of a world, e.g. the bundled demo analyses of `bdlens ensemble`: "
        "bdlens world export-analysis --init 2002-07-05T00 2002-09-03T00 2002-11-02T00 --overwrite",
    )
    export.add_argument("--world", type=Path, help="world directory (default: the default demo world, built or reused)")
    export.add_argument("--init", nargs="+", required=True, metavar="TIME", help="init times, ISO")
    export.add_argument("--history-hours", nargs="+", type=int, default=[6, 24, 30],
                        help="hours before each init also written (default: 6 24 30, the bundled step models' inputs and "
                             "the start of the bred vectors' breeding window)")
    export.add_argument("--out", type=Path, help="output zarr (default: the package's bundled demo analyses)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=_export)


def _print_summary(world: Path) -> None:
    from bdlens.world.build import read_manifest

    manifest = read_manifest(world)
    print(f"world: {world}")
    print(f"built: {manifest['built_at']} in {manifest['build_seconds']} s (bdlens {manifest['bdlens_version']})")
    print(json.dumps(manifest["summary"], indent=2))


def _build(args: argparse.Namespace) -> int:
    from bdlens.world.build import build

    _print_summary(build(args.config, small=args.small, cache_dir=args.cache_dir, force=args.force))
    return 0


def _summary(args: argparse.Namespace) -> int:
    _print_summary(args.world)
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from bdlens.world.ensemble import physics_ensemble

    out = physics_ensemble(
        args.world, args.init_times, args.members, args.lead_hours, args.out, overwrite=args.overwrite, member_batch=args.member_batch
    )
    print(out)
    return 0


def _export(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from bdlens.data.export import BUNDLED_ANALYSIS, export_analysis
    from bdlens.world.build import build

    world = args.world or build()
    out = export_analysis(world, args.init, args.history_hours, args.out or BUNDLED_ANALYSIS,
                          shlex.join(["bdlens", *sys.argv[1:]]), overwrite=args.overwrite)
    print(out)
    return 0
