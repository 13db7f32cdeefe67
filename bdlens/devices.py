"""Where bdlens computes, shared by the ensemble engine and the trainers (docs/gpu.md): the device of
this process and its place in a ``torchrun`` job (:class:`Distributed`), bf16 autocast, moving
batches, and out-of-memory errors as one-line messages.

CPU runs in fp32 take none of these paths' extra steps (``.to("cpu")`` of a CPU tensor is the tensor
itself, fp32 uses no autocast context), so their numbers are those of a CPU-only bdlens, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from bdlens.errors import BdlensError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else the CPU; ``cuda`` → this process's GPU (``cuda:LOCAL_RANK``
    under torchrun, ``cuda:0`` otherwise); ``cuda`` without CUDA is a :class:`BdlensError`."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise BdlensError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BdlensError("--device cuda was asked for but this machine has no CUDA device; use --device cpu or auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16: ``torch.autocast`` on ``device`` (matmuls and attention in bfloat16, reductions in fp32);
    fp32: no context at all, so the fp32 path is the plain one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors in tuples, named tuples such as :class:`bdlens.data.Fields`, lists; other
    leaves as they are) with every tensor on ``device`` (to a GPU asynchronously from pinned memory;
    never asynchronously to the CPU, where the values would be read before they arrive).

    Hand-written: torch's tree utilities (``torch.utils._pytree``) are private."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(x, device) for x in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(x, device) for x in batch)
    return batch


@contextlib.contextmanager
def out_of_memory(advice: str) -> Iterator[None]:
    """Turn running out of accelerator memory (``torch.OutOfMemoryError``, which
    ``torch.cuda.OutOfMemoryError`` is) into a one-line :class:`BdlensError` that ends with ``advice``."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        said = str(err).splitlines()[0] if str(err) else "no details"
        raise BdlensError(f"out of GPU memory ({said[:160]}); {advice}") from None


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly) and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> Distributed:
        """Read ``RANK``/``WORLD_SIZE`` (set by torchrun), resolve ``device`` (``auto``, ``cpu``,
        ``cuda``: see :func:`bdlens.devices.resolve_device`) and join the process group when there
        are several ranks: nccl on GPUs, gloo on CPUs."""
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world_size, resolved)

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, checkpoints and validation."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def check_batch(self, batch_size: int) -> None:
        """Each rank must get the same number of samples, else the averaged gradient is not the batch mean."""
        if batch_size % self.world_size:
            raise BdlensError(f"batch_size {batch_size} is not divisible by the {self.world_size} processes; pick a multiple")
