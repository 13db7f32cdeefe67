"""The ``bdlens`` command line.

Each sub-command lives in its own module under ``bdlens.cli`` and exposes ``register(subparsers)``;
this module only wires them together, sets up logging and turns :class:`BdlensError` into a one-line
message with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bdlens import __version__
from bdlens.errors import BdlensError

# Sub-command modules, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = ("ensemble", "world", "train", "evaluate", "report")

log = logging.getLogger("bdlens")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="bdlens",
        description="Calibrated AI weather ensembles with Bayesian deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"bdlens {__version__}")
    _add_verbosity(parser, default=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"bdlens.cli.{name}").register(sub)
    _verbosity_everywhere(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: bool) -> None:
    """-v/-q; on sub-commands without defaults, so that they override the top level only when given."""
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0 if default else argparse.SUPPRESS,
                           help="more log output (-vv for debug, also from the libraries)")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=False if default else argparse.SUPPRESS,
                           help="only warnings and errors, no progress")


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept -v/-q after every sub-command too (``bdlens train vi ... -q``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbosity(sub, default=False)
                _verbosity_everywhere(sub)


def configure_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr: bdlens's messages at WARNING with -q, INFO by default, DEBUG with -vv; other
    libraries' (JAX's backend search, dask, …) only from WARNING, unless -vv."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("bdlens").setLevel(level)
    from bdlens import progress

    progress.set_enabled(not quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bdlens`` console script; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except BdlensError as err:
        print(f"bdlens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bdlens {args.command}: interrupted; {_how_to_continue(args, argv)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`bdlens ... | head`): stop quietly like any Unix filter, with the
        # shell's status for SIGPIPE, and send what Python still flushes at exit to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _how_to_continue(args: argparse.Namespace, argv: list[str]) -> str:
    """What to run after an interruption: the same command with --resume for a resumable run."""
    if not hasattr(args, "resume"):
        return "its output was not written; run the command again"
    from bdlens.training.run import STATE

    if not (Path(args.out) / STATE).is_file():
        return "nothing was saved yet; start again with --overwrite instead of --resume"
    again = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
    return f"continue from the last saved state with: {shlex.join(['bdlens', *again])}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
