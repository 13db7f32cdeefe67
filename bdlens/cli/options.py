"""Argument groups shared by several ``bdlens`` commands (one definition, one wording)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer ≥ 1 (counts and sizes: threads, members, hours)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_run_mode(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--overwrite`` for commands that write a run directory ``--out``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    mode.add_argument("--overwrite", action="store_true", help="delete --out and start over")


def add_data_options(parser: argparse.ArgumentParser, trained_on: str) -> None:
    """``--world`` and ``--threads`` for commands that read data through a trained checkpoint."""
    parser.add_argument("--world", help=f"data: 'demo', 'small' or a WB2 zarr (default: the data the {trained_on} was trained on)")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
