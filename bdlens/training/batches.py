"""Turning dataset samples into model batches, shared by the trainers and their validation.

Samples are ``((X_{t−Δ}, X_t), X_{t+Δ})`` of :class:`~bdlens.data.Fields` (normalised), as
:class:`bdlens.data.WeatherDataset` returns them. Training inputs may come from the analysis
(truth + analysis error) instead of the truth, input time by input time, so that models learn to
forecast from imperfect initial states as they will be used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from bdlens import streams
from bdlens.data import Fields
from bdlens.devices import to_device
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.training.distributed import Distributed, batch_indices

State = tuple[torch.Tensor, torch.Tensor]


def collate(
    dataset: Dataset, indices: Sequence[int], analysis_inputs: tuple[Dataset, torch.Tensor] | None = None
) -> tuple[Fields, Fields]:
    """Model inputs (upper (B, T_in, V, Z, H, W), surface (B, T_in, V, H, W)) and the targets (B, …), as Fields.

    ``analysis_inputs`` = (analysis dataset, boolean (B, T_in) choice): where the choice is true the
    input time is taken from the analysis instead of the truth; targets are always the truth.
    """
    inputs, target = default_collate([dataset[int(i)] for i in indices])
    upper, surface = torch.stack([x[0] for x in inputs], 1), torch.stack([x[1] for x in inputs], 1)
    if analysis_inputs is not None:
        analysis, choice = analysis_inputs
        noisy, _ = default_collate([analysis[int(i)] for i in indices])
        pick = choice[:, :, None, None, None]
        upper = torch.where(pick[..., None], torch.stack([x[0] for x in noisy], 1), upper)
        surface = torch.where(pick, torch.stack([x[1] for x in noisy], 1), surface)
    return Fields(upper, surface), Fields(*target)


class _StepBatches(Dataset):
    """Item s is the batch of optimiser step s, ``make(s)`` (so a DataLoader's workers build whole batches)."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        self.make = make

    def __getitem__(self, step: int) -> Any:
        return self.make(step)


def _as_made(batch: Any) -> Any:
    """The batch as ``make`` built it (torch's default conversion would turn its tuples into lists)."""
    return batch


class BatchLoader:
    """This rank's batch of every optimiser step, ``make(step)``, on ``device``.

    ``make`` must depend on the step alone (the trainers' batches do: seeded orders of
    :mod:`bdlens.streams`), so the batches are the same however they are made: with ``workers`` 0 in
    this process when asked for (the plain path), else by a ``torch.utils.data.DataLoader`` whose
    ``workers`` processes build the next batches ahead, in step order, into pinned memory when the
    device is a GPU. A step out of order (the first, or one after a resume) restarts the loader there.
    """

    def __init__(self, make: Callable[[int], Any], steps: int, workers: int, device: torch.device) -> None:
        self.make, self.steps, self.workers, self.device = make, steps, workers, device
        self._next: int | None = None
        self._batches: Iterator[Any] | None = None

    def __call__(self, step: int) -> Any:
        """The batch of ``step`` (0-based, below ``steps``), on the device."""
        if self.workers == 0:
            return to_device(self.make(step), self.device)
        if step != self._next:
            loader = DataLoader(_StepBatches(self.make), batch_size=None, sampler=range(step, self.steps), num_workers=self.workers,
                                collate_fn=_as_made, pin_memory=self.device.type == "cuda",
                                generator=torch.Generator())  # the workers' seeds: not a draw from the training's RNG
            self._batches = iter(loader)
        self._next = step + 1
        return to_device(next(self._batches), self.device)


def analysis_choice(seed: int, step: int, rank: int, batch: int, input_times: int, probability: float) -> torch.Tensor:
    """Which input times of this rank's batch at ``step`` come from the analysis: boolean (batch, input_times),
    each true with ``probability``, from the stream (seed, "analysis-inputs", rank, step) of
    :mod:`bdlens.streams` alone (so resuming replays it)."""
    draw = streams.generator(seed, "analysis-inputs", member=rank, step=step)
    return torch.rand(batch, input_times, generator=draw) < probability


def seeded_batch(
    step: int, dataset: Dataset, batch_size: int, seed: int, dist_info: Distributed, analysis: Dataset | None = None,
    probability: float = 0.0, input_times: int = 2,
) -> tuple[Fields, Fields]:
    """This rank's (inputs, targets) at optimiser ``step``: the step's seeded batch
    (:func:`~bdlens.training.distributed.batch_indices`), each of the ``input_times`` input times
    taken from ``analysis`` with ``probability`` (:func:`analysis_choice`); see :func:`collate`."""
    indices = batch_indices(step, len(dataset), batch_size, seed, dist_info)
    analysis_inputs = None
    if analysis is not None and probability > 0:
        analysis_inputs = (analysis, analysis_choice(seed, step, dist_info.rank, len(indices), input_times, probability))
    return collate(dataset, indices, analysis_inputs)


def lead_targets(dataset: Dataset, leads: tuple[int, ...], max_forecasts: int) -> list[tuple[int, list[int]]]:
    """(sample index, [sample index whose target is lead l ahead, per lead]) for evenly spread forecasts.

    The target of lead l (in steps Δ) from anchor t is the target of the sample anchored at
    t + (l−1)Δ; leads beyond one step need a dataset with ``times`` and ``step`` attributes (as
    :class:`bdlens.data.WeatherDataset` has).
    """
    n = len(dataset)
    if max(leads) == 1:
        chosen = np.unique(np.linspace(0, n - 1, min(n, max_forecasts)).round().astype(int))
        return [(int(i), [int(i)]) for i in chosen]
    times, step = getattr(dataset, "times", None), getattr(dataset, "step", None)
    if times is None or step is None:
        raise BdlensError("validation leads beyond one step need a dataset with `times` and `step` (a WeatherDataset)")
    position = {t: i for i, t in enumerate(np.asarray(times))}
    usable = []
    for i, t in enumerate(np.asarray(times)):
        later = [position.get(t + (lead - 1) * step) for lead in leads]
        if all(j is not None for j in later):
            usable.append((i, later))
    if not usable:
        raise BdlensError(f"the validation split is too short for leads {list(leads)} steps; shorten the leads")
    chosen = np.unique(np.linspace(0, len(usable) - 1, min(len(usable), max_forecasts)).round().astype(int))
    return [usable[c] for c in chosen]


def collate_states(dataset: Dataset, indices: Sequence[int]) -> tuple[State | None, State]:
    """The latest two input states (X_{t−Δ} or None for one-input models, X_t) of the given samples, batched."""
    inputs, _ = default_collate([dataset[int(i)] for i in indices])
    inputs = [tuple(x) for x in inputs]
    return (inputs[-2] if len(inputs) > 1 else None), inputs[-1]


def collate_targets(dataset: Dataset, indices: Sequence[int]) -> State:
    """The targets X_{t+Δ} of the given samples, batched."""
    return tuple(default_collate([dataset[int(i)][1] for i in indices]))


def latitudes(model: Any, dataset: Dataset | None = None) -> np.ndarray:
    """Grid latitudes (degrees, ascending) for a model (anything with a ``config``: a 3DEST, a
    posterior): the dataset's grid, else the config's, else equiangular without poles."""
    grid = getattr(getattr(dataset, "layout", None), "grid", None)
    if grid is not None:
        return grid.latitudes()
    config = model.config
    if config.grid is not None:
        return GRIDS[config.grid].latitudes()
    return -90.0 + 180.0 / config.nlat * (np.arange(config.nlat) + 0.5)
