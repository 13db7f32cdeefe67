"""Data-parallel training across ``torchrun`` processes, shared by the trainers. A process's place in
the job (:class:`bdlens.devices.Distributed`: rank, world size, device, process group) lives with the
devices, since the ensemble engine's ranks use it too.

Each process computes on its own device (:func:`bdlens.devices.resolve_device`): ``cuda:LOCAL_RANK``
on a GPU machine, with the nccl process group, or the CPU, with gloo's (docs/gpu.md). Collectives
run on that device; what they return to the caller (RNG states, numbers) is on the CPU.

Every rank holds the whole model and takes a disjoint slice of each global batch
(:func:`batch_indices`); gradients are averaged over the ranks before each optimiser step
(:func:`average_gradients`, inside :func:`optimizer_step` and the VI trainer's pyro optimiser), so all
ranks apply the same update and keep identical weights (:func:`max_difference_between_ranks`
checks it). Each rank keeps its own RNG streams (dropout masks, weight samples): the CPU generator's,
and on a GPU the CUDA generator's, saved per rank (:func:`gather_rng_states`) so that a resumed run
continues every stream exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from bdlens import streams
from bdlens.devices import Distributed
from bdlens.errors import BdlensError


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
    tensor = torch.tensor([value], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(tensor)
    return float(tensor) / dist_info.world_size


def _all_gather(tensor: torch.Tensor, dist_info: Distributed) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in rank order, gathered on this rank's device
    (nccl gathers GPU tensors only); a collective."""
    tensor = tensor.to(dist_info.device)
    gathered = [torch.empty_like(tensor) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, tensor)
    return gathered


def gather_rng_states(dist_info: Distributed) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states in rank order, as CPU tensors: ``torch_rng`` (the CPU generator) and,
    on a GPU, ``cuda_rng`` (the generator of the rank's device). A collective: all ranks must call it."""
    states = {"torch_rng": torch.get_rng_state()}
    if dist_info.device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(dist_info.device)
    if not dist_info.parallel:
        return {key: [rng] for key, rng in states.items()}
    return {key: [g.cpu() for g in _all_gather(rng, dist_info)] for key, rng in states.items()}


def set_rng_states(states: dict[str, list[torch.Tensor]], dist_info: Distributed) -> None:
    """Give this rank its saved RNG states back (:func:`gather_rng_states`): the CPU generator's
    always, the CUDA generator's when the run saved one and now runs on a GPU (a GPU run resumes on
    the CPU and a CPU run on a GPU, each without the other's generator)."""
    torch.set_rng_state(states["torch_rng"][dist_info.rank])
    if "cuda_rng" in states and dist_info.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda_rng"][dist_info.rank], dist_info.device)


def max_difference_between_ranks(parameters: Iterable[torch.Tensor], dist_info: Distributed) -> float:
    """The largest absolute difference of any weight between any rank and rank 0 (a collective; 0.0 on one process)."""
    if not dist_info.parallel:
        return 0.0
    gathered = _all_gather(torch.cat([p.detach().reshape(-1) for p in parameters]), dist_info)
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
