"""Where bdlens computes, shared by the ensemble engine and the trainers (docs/gpu.md): the device of
this process, bf16 autocast, moving batches, and out-of-memory errors as one-line messages.

CPU runs in fp32 take none of these paths' extra steps (``.to("cpu")`` of a CPU tensor is the tensor
itself, fp32 uses no autocast context), so their numbers are those of a CPU-only bdlens, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch

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
