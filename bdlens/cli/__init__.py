"""The ``bdlens`` command line.

Each sub-command lives in its own module under ``bdlens.cli`` and exposes ``register(subparsers)``;
this module only wires them together, sets up logging and turns :class:`BdlensError` into a one-line
message with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bdlens import __version__
from bdlens.errors import BdlensError

# Sub-command modules, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = ("world", "train", "evaluate", "report", "perturb")

log = logging.getLogger("bdlens")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="bdlens",
        description="Calibrated AI weather ensembles with Bayesian deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"bdlens {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"bdlens.cli.{name}").register(sub)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr: WARNING with -q, INFO by default, DEBUG with -vv."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    from bdlens import progress

    progress.set_enabled(not quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bdlens`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except BdlensError as err:
        print(f"bdlens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bdlens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
