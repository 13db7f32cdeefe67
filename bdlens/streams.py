"""Every random stream of bdlens, derived from (seed, stream name, init key, member, step).

A draw is keyed by the run's ``seed``, the ``stream`` it serves (e.g. ``"posterior-weights"``,
``"sppt"``, ``"learned-perturbation"``, ``"initial-condition"``; in training ``"sample-order"``,
``"analysis-inputs"``, ``"perturbation-training"``), the forecast's *init key* (its init
time in whole hours since 1970, :func:`init_key`), the ensemble member and the step (for rollouts:
the lead in hours of the state being produced). The key goes through :class:`numpy.random.SeedSequence`
(a well-mixed hash: neighbouring keys give independent streams) into a CPU ``torch.Generator``, so
a member's values depend on nothing else: not on the batch it is computed in, its neighbours, the
number of processes or the device, and a resumed run redraws exactly what it would have drawn.
Draws are made on the CPU and moved to the device afterwards, so CPU and GPU runs agree.

Why hand-written: torch has no counter-based generator API on the CPU; SeedSequence gives the
stateless keyed derivation and torch's generator the fast normal draws.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from bdlens.errors import BdlensError


def _words(value: int) -> tuple[int, int]:
    """Any int64 as two non-negative 32-bit words (its two's complement), so keys never collide."""
    unsigned = int(value) % 2**64
    return unsigned & 0xFFFFFFFF, unsigned >> 32


def generator(seed: int, stream: str, member: int = 0, step: int = 0, init: int | None = None) -> torch.Generator:
    """The CPU generator of (seed, stream, member, step[, init]); independent of every other key."""
    if member < 0:
        raise BdlensError(f"member indices must be non-negative, got {member}")
    key: tuple[int, ...] = (zlib.crc32(stream.encode()), int(member), int(step))
    if init is not None:
        key += _words(init)
    state = np.random.SeedSequence(int(seed) % 2**64, spawn_key=key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def normal(
    shapes: Sequence[tuple[int, ...]],
    seed: int,
    stream: str,
    members: Sequence[int],
    step: int = 0,
    init: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Standard normal draws, one tensor (len(members), *shape) per shape; member m's row comes from
    :func:`generator` (seed, stream, m, step, init) alone (shapes are drawn one after the other)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.stack([torch.randn(sum(sizes), generator=generator(seed, stream, m, step, init), dtype=dtype) for m in members])
    return [chunk.reshape(len(members), *shape) for chunk, shape in zip(torch.split(flat, sizes, dim=1), shapes, strict=True)]


def init_key(time: np.datetime64) -> int:
    """The key of an init time: whole hours since 1970-01-01 (refuses times off the hour)."""
    t = np.datetime64(time, "ns")
    hours = t.astype("datetime64[h]")
    if hours != t:
        raise BdlensError(f"init times must be whole hours, got {np.datetime_as_string(t, unit='m')}; round them to the hour")
    return int(hours.astype(np.int64))
