"""Argument groups shared by several ``bdlens`` commands (one definition, one wording)."""

from __future__ import annotations

import argparse

from bdlens.errors import BdlensError


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (torch intra-op threads); None keeps torch's choice, < 1 is refused."""
    if threads is None:
        return
    if threads < 1:
        raise BdlensError(f"--threads must be at least 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)


def add_run_mode(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--overwrite`` for commands that write a run directory ``--out``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    mode.add_argument("--overwrite", action="store_true", help="delete --out and start over")


def add_data_options(parser: argparse.ArgumentParser, trained_on: str) -> None:
    """``--world`` and ``--threads`` for commands that read data through a trained checkpoint."""
    parser.add_argument("--world", help=f"data: 'demo', 'small' or a WB2 zarr (default: the data the {trained_on} was trained on)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
