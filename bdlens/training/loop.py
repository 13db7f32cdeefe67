"""The one training loop of every ``bdlens train`` command; each objective plugs into it.

An :class:`Objective` owns its models, optimiser and data and knows how to take one optimiser step
(:meth:`Objective.train_step`), validate and write its checkpoint. :func:`run` does everything
else, the same way for all of them:

* the run directory (:mod:`bdlens.training.run`): ``metrics.jsonl`` (one record per ``log_every``
  steps, the loss averaged over the ranks, plus the objective's validation rows), ``state.pt``
  every ``checkpoint_every`` steps and at the end, ``checkpoint/`` at the end;
* exact resume: the objective's stateful objects, the step, the training time and every rank's RNG
  come back from ``state.pt`` (a run stopped after any saved step and resumed ends bit for bit where
  an uninterrupted run ends); the log lines after the saved step are dropped and redone;
* data parallelism under ``torchrun`` (:mod:`bdlens.training.distributed`): the objective averages
  its gradients, rank 0 writes, and the ranks' weights are compared at the end;
* a progress bar (rank 0) and the training time (``train_seconds``, without validation);
* running out of GPU memory ends the run with a one-line error that says what to lower (the run
  resumes from its last ``state.pt`` after the change: device, precision and loader workers may change).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from torch import Tensor

from bdlens.devices import out_of_memory
from bdlens.progress import bar
from bdlens.training.distributed import Distributed, average_scalar
from bdlens.training.run import (
    CHECKPOINT,
    create_run_dir,
    log_metrics,
    log_rank_agreement,
    read_state,
    restore,
    save_state,
    truncate_metrics,
)

log = logging.getLogger(__name__)

OUT_OF_MEMORY_ADVICE = ("lower the batch size, set `checkpoint: true` in the model config (activation checkpointing) "
                        "or `precision: bf16`, then continue with --resume")


@dataclass(frozen=True)
class Cadence:
    """Optimiser steps in all, and how often to log, validate (0: never) and save the state."""

    steps: int
    log_every: int
    validate_every: int
    checkpoint_every: int


class Objective:
    """What a trainer adds to the loop. Subclasses set :attr:`config` (checked on resume),
    :attr:`cadence` and implement :meth:`stateful`, :meth:`train_step`, :meth:`parameters` and
    :meth:`save`; the other hooks are optional."""

    description: str = "training"  # progress bar label
    what: ClassVar[str] = "training"  # names the config in a resume error
    may_change: ClassVar[tuple[str, ...]] = ()  # dotted config fields a resumed run may change
    # What else the run depends on, compared on resume (config contents, the --from checkpoint's hash).
    depends: dict | None = None
    config: BaseModel
    cadence: Cadence

    def stateful(self) -> dict[str, Any]:
        """Objects with ``state_dict`` / ``load_state_dict`` (models, optimisers, schedules), saved under their keys."""
        raise NotImplementedError

    def fresh_start(self, dist_info: Distributed) -> None:
        """Called instead of a resume (e.g. to seed each rank's RNG)."""

    def train_step(self, step: int) -> dict[str, float]:
        """One optimiser step at 0-based ``step``; returns the log fields, with this rank's ``loss``."""
        raise NotImplementedError

    def log_fields(self) -> dict[str, float]:
        """Extra fields for a log record, computed at logging time only (on every rank)."""
        return {}

    def validate(self) -> list[dict[str, Any]]:
        """Validation records (rank 0 only; each is logged with the step)."""
        return []

    def parameters(self) -> Iterable[Tensor]:
        """The trained tensors, compared across ranks at the end."""
        raise NotImplementedError

    def save(self, directory: Path, summary: dict[str, Any]) -> Path:
        """Write the checkpoint to ``directory`` (rank 0); ``summary`` holds ``step`` and ``train_seconds``."""
        raise NotImplementedError


def run(objective: Objective, run_dir: str | Path, dist_info: Distributed, resume: bool = False) -> Path:
    """Train ``objective`` in ``run_dir`` (checked beforehand with :func:`bdlens.training.run.check_run_dir`)
    up to ``objective.cadence.steps``; returns the checkpoint directory (written by rank 0)."""
    run_dir = Path(run_dir)
    cadence = objective.cadence
    create_run_dir(run_dir, objective.what, dist_info)
    step, elapsed = 0, 0.0
    if resume:
        state = read_state(run_dir, objective.config, objective.what, objective.may_change, objective.depends)
        step, elapsed = restore(state, dist_info, **objective.stateful())
        log.info("resumed %s at step %d", run_dir, step)
    else:
        objective.fresh_start(dist_info)
    if dist_info.main:
        truncate_metrics(run_dir, step)
    quiet_rank = {} if dist_info.main else {"disable": True}
    progress = bar(total=cadence.steps, initial=step, desc=objective.description, unit="step", **quiet_rank)
    with progress, out_of_memory(OUT_OF_MEMORY_ADVICE):
        while step < cadence.steps:
            tick = time.perf_counter()
            fields = objective.train_step(step)
            step += 1
            elapsed += time.perf_counter() - tick
            progress.update(1)
            progress.set_postfix(loss=f"{fields['loss']:.4f}")
            last = step == cadence.steps
            if step % cadence.log_every == 0 or last:
                record = {**fields, "loss": average_scalar(fields["loss"], dist_info), **objective.log_fields()}  # the global batch's loss
                if dist_info.main:
                    log_metrics(run_dir, {"step": step, **record, "train_seconds": round(elapsed, 1)})
            if dist_info.main and cadence.validate_every and (step % cadence.validate_every == 0 or last):
                for row in objective.validate():
                    log_metrics(run_dir, {"step": step, **row})
            if step % cadence.checkpoint_every == 0 or last:
                state = {key: obj.state_dict() for key, obj in objective.stateful().items()}
                save_state(run_dir, {**state, "step": step, "elapsed": elapsed}, objective.config, dist_info, objective.depends)
    log_rank_agreement(run_dir, objective.parameters(), dist_info)
    if not dist_info.main:
        return run_dir / CHECKPOINT
    return objective.save(run_dir / CHECKPOINT, {"step": step, "train_seconds": round(elapsed, 1)})
