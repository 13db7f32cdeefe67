"""Data-parallel training across ``torchrun`` processes, shared by the trainers.

The trainers keep models and batches on the CPU, so the process group is gloo's (nccl would need
every tensor on a GPU; moving the trainers to GPUs is future work and would switch the backend too).

Every rank holds the whole model and takes a disjoint slice of each global batch
(:func:`batch_indices`); gradients are averaged over the ranks before each optimiser step
(:func:`average_gradients`, inside :func:`optimizer_step` and the VI trainer's pyro optimiser), so all
ranks apply the same update and keep identical weights (:func:`max_difference_between_ranks`
checks it). Each rank keeps its own RNG stream (dropout masks, weight samples), saved per rank
(:func:`gather_rng_states`) so that a resumed run continues every stream exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bdlens import streams
from bdlens.errors import BdlensError


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        """Read ``RANK``/``WORLD_SIZE`` (set by torchrun) and join the process group when there are several ranks."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")  # CPU tensors (see the module docstring)
        return cls(int(os.environ.get("RANK", "0")), world_size)

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


def batch_indices(step: int, n_samples: int, batch_size: int, seed: int, dist_info: Distributed) -> list[int]:
    """This rank's sample indices for global ``step``: a seeded permutation per epoch cut into whole
    batches, so resuming at any step replays exactly the same batches; rank r takes every r-th sample."""
    per_epoch = n_samples // batch_size
    if per_epoch == 0:
        raise BdlensError(f"batch_size {batch_size} exceeds the {n_samples} training samples; lower batch_size")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_samples, generator=streams.generator(seed, "sample-order", step=epoch))
    batch = order[position * batch_size : (position + 1) * batch_size]
    return batch[dist_info.rank :: dist_info.world_size].tolist()


def average_gradients(parameters: Iterable[torch.Tensor], dist_info: Distributed) -> None:
    """Replace each gradient by its mean over the ranks (one flat all-reduce, in the given order,
    which must be the same on every rank). A no-op on a single process."""
    if not dist_info.parallel:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist_info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_scalar(value: float, dist_info: Distributed) -> float:
    """The mean of a per-rank number (e.g. the loss of each rank's slice of the batch) over the ranks."""
    if not dist_info.parallel:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist_info.world_size


def gather_rng_states(dist_info: Distributed) -> list[torch.Tensor]:
    """Every rank's CPU RNG state, in rank order (a collective: all ranks must call it)."""
    rng = torch.get_rng_state()
    if not dist_info.parallel:
        return [rng]
    gathered = [torch.empty_like(rng) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, rng)
    return gathered


def max_difference_between_ranks(parameters: Iterable[torch.Tensor], dist_info: Distributed) -> float:
    """The largest absolute difference of any weight between any rank and rank 0 (a collective; 0.0 on one process)."""
    if not dist_info.parallel:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    gathered = [torch.empty_like(flat) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def optimizer_step(
    loss: torch.Tensor, parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float, dist_info: Distributed,
) -> float:
    """One update of a torch trainer: backward, gradients averaged over the ranks, norm clipped to
    ``grad_clip``, optimiser and schedule stepped. Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters, dist_info)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    scheduler.step()
    return float(grad_norm)
