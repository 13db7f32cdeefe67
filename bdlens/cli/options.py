"""Argument groups shared by several ``bdlens`` commands (one definition, one wording)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bdlens.errors import BdlensError

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger(__name__)



def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (torch intra-op threads); None keeps torch's choice, < 1 is refused."""
    if threads is None:
        return
    if threads < 1:
        raise BdlensError(f"--threads must be at least 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)


def add_device(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--device`` for the commands that compute with torch (``None``: the config's choice)."""
    parser.add_argument("--device", default=default, choices=("auto", "cpu", "cuda"),
                        help="auto (CUDA when present), cpu or cuda: the GPU of LOCAL_RANK under torchrun (default: "
                        f"{default or 'the config device, auto unless it says otherwise'}; docs/gpu.md)")


def with_device(config: BaseModel, device: str | None) -> BaseModel:
    """A training config with its ``device`` (top level, or in its ``training`` settings) replaced by ``--device`` when given."""
    if device is None:
        return config
    if "training" in type(config).model_fields:
        return config.model_copy(update={"training": config.training.model_copy(update={"device": device})})
    return config.model_copy(update={"device": device})


def add_run_mode(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--overwrite`` for commands that write a run directory ``--out``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    mode.add_argument("--overwrite", action="store_true", help="delete --out and start over")


def add_data_options(parser: argparse.ArgumentParser, trained_on: str) -> None:
    """``--world`` and ``--threads`` for commands that read data through a trained checkpoint."""
    parser.add_argument("--world", help=f"data: 'demo', 'small' or a WB2 zarr (default: the data the {trained_on} was trained on)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """``--member-dim``, ``--quantiles``, ``--seed`` and ``--scheduler`` for the commands that score forecasts."""
    parser.add_argument("--member-dim", default="number", help="name of the ensemble member dimension (default: number; member and realization are recognised)")
    parser.add_argument(
        "--quantiles", nargs="+", type=float, help="climatological quantiles of the Brier scores and reliability diagrams (default: 0.1 0.5 0.9)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rank-histogram tie breaking (default: 0)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="address of a dask.distributed scheduler, e.g. tcp://host:8786")


@contextlib.contextmanager
def dask_scheduler(address: str | None) -> Iterator[None]:
    """Connect a dask.distributed client for the duration, or use the local threaded scheduler."""
    if address is None:
        yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout="20s")
    except OSError as err:
        raise BdlensError(f"cannot reach the dask scheduler at {address} ({err}); check the address and that it is running") from err
    log.info("computing on the dask cluster at %s (%d workers)", address, len(client.scheduler_info().get("workers", {})))
    try:
        yield
    finally:
        client.close()
