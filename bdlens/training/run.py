"""A trainer's run directory, shared by every ``bdlens train`` command.

    <run>/metrics.jsonl   one JSON record per line (training log, validation rows), rank 0 only
    <run>/state.pt        everything an exact resume needs (read back with ``weights_only=True``)
    <run>/checkpoint/     the trained model (safetensors + manifest.json)

A non-empty run directory is never reused silently: ``resume`` continues it, ``overwrite`` replaces it,
and only if it is a bdlens run that holds nothing else (:mod:`bdlens.outputs`). A resume also checks
that everything the run depends on (the resolved model and data configs, the ``--from`` checkpoint's
hash) is unchanged, and keeps every file it did not write.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bdlens.checkpoint import MANIFEST
from bdlens.errors import BdlensError
from bdlens.outputs import mark_output, prepare_output
from bdlens.training.distributed import Distributed, gather_rng_states, max_difference_between_ranks, set_rng_states

METRICS = "metrics.jsonl"
STATE = "state.pt"
CHECKPOINT = "checkpoint"
RUN_KIND = "training run"
#: Every file a trainer writes in its run directory. A directory with nothing else, holding state.pt
#: and metrics.jsonl, is a run written before the output marker existed (it may be resumed or
#: replaced); one killed before its first state.pt is only recognised by its marker.
RUN_LAYOUT = (METRICS, STATE, f".{STATE}.tmp", f"{CHECKPOINT}/{MANIFEST}", f"{CHECKPOINT}/*.safetensors", f"{CHECKPOINT}/.*.tmp")

log = logging.getLogger(__name__)


def check_run_dir(
    run_dir: str | Path, resume: bool = False, overwrite: bool = False, main: bool = True, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Check ``run_dir`` before any work starts (rank 0 only touches the disk); returns it as a Path.

    :func:`bdlens.outputs.prepare_output` decides: a non-empty directory needs ``resume`` (a bdlens
    run with a ``state.pt``) or ``overwrite`` (a bdlens run holding nothing else, then deleted); an
    ``inputs`` path (``--from``, the data, the config) is never the run directory. The trainer
    creates the directory when it first writes (:func:`create_run_dir`), so a run that fails while
    loading its data leaves nothing.
    """
    run_dir = Path(run_dir)
    if not main:
        return run_dir
    prepare_output(run_dir, RUN_KIND, overwrite, resume, inputs, layout=RUN_LAYOUT, required=(STATE, METRICS), resumable=True)
    if resume and not (run_dir / STATE).is_file():
        raise BdlensError(f"nothing to resume in {run_dir} (no {STATE}: it stopped before its first save); start over with --overwrite")
    return run_dir


def create_run_dir(run_dir: Path, trainer: str, dist_info: Distributed) -> None:
    """Create (rank 0) the run directory with bdlens's output marker, naming the ``trainer``."""
    if dist_info.main:
        mark_output(run_dir, RUN_KIND, trainer=trainer)


def log_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to ``run_dir/metrics.jsonl``."""
    with (run_dir / METRICS).open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (empty if there is none)."""
    path = run_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the records up to ``step`` (those after the checkpoint we resume from are redone);
    ``step`` 0 starts a fresh log."""
    path = run_dir / METRICS
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if step and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def last_validation(run_dir: Path) -> list[dict[str, Any]]:
    """The validation rows (``"split": "val"``) of the latest step that has any."""
    val = [r for r in read_metrics(run_dir) if r.get("split") == "val"]
    last = max((r["step"] for r in val), default=None)
    return [r for r in val if r["step"] == last]


def save_state(
    run_dir: Path, state: dict[str, Any], config: BaseModel, dist_info: Distributed, depends: dict[str, Any] | None = None
) -> None:
    """Write ``state`` plus every rank's RNG states (``torch_rng`` and on GPUs ``cuda_rng``, lists in
    rank order: :func:`~bdlens.training.distributed.gather_rng_states`), ``config``
    and ``depends`` (what else the run depends on, e.g. resolved configs or a checkpoint hash; both
    as JSON, checked on resume) to ``run_dir/state.pt`` atomically. A collective: every rank calls
    it, rank 0 writes."""
    rng_states = gather_rng_states(dist_info)
    if not dist_info.main:
        return
    tmp = run_dir / f".{STATE}.tmp"
    torch.save({**state, **rng_states, "config": config.model_dump_json(), "depends": json.dumps(depends or {})}, tmp)
    tmp.replace(run_dir / STATE)


def log_rank_agreement(run_dir: Path, parameters: Iterable[torch.Tensor], dist_info: Distributed) -> None:
    """After data-parallel training, log the largest weight difference between ranks (it must be 0.0).
    A collective on several ranks; nothing on one process."""
    if dist_info.parallel:
        difference = max_difference_between_ranks(parameters, dist_info)
        if dist_info.main:
            log_metrics(run_dir, {"ranks": dist_info.world_size, "max_weight_difference_between_ranks": difference})


def read_state(
    run_dir: Path, config: BaseModel, what: str, may_change: tuple[str, ...] = (), depends: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``run_dir/state.pt`` (read with ``weights_only=True``, every tensor onto the CPU whatever device
    wrote it; ``load_state_dict`` then places it on the run's device) after checking it was written with ``config``
    and the same ``depends`` (see :func:`save_state`; a state from before ``depends`` was saved is
    checked on ``config`` only, with a warning).

    ``what`` names the config in the error (e.g. "training", "perturbation"); ``may_change`` lists
    dotted fields that may differ (e.g. ``"training.steps"``, to train a finished run for longer).
    """
    path = run_dir / STATE
    if not path.is_file():
        raise BdlensError(f"nothing to resume in {run_dir} (no {STATE}); start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise BdlensError(f"{path} cannot be read ({type(err).__name__}); restart the run with --overwrite") from None
    saved, given = json.loads(state["config"]), json.loads(config.model_dump_json())
    for dotted in may_change:
        *parents, leaf = dotted.split(".")
        for tree in (saved, given):
            for key in parents:
                tree = tree.get(key, {})
            tree.pop(leaf, None)
    if saved != given:
        allowed = f" (only {', '.join(may_change)} may change)" if may_change else ""
        raise BdlensError(f"{run_dir} was started with a different {what} config; resume with the same config{allowed}")
    if "depends" not in state:
        log.warning("%s was saved by an older bdlens that did not record its resolved configs and checkpoints; "
                    "resuming on the %s config alone", path, what)
        return state
    saved_depends, given_depends = json.loads(state["depends"]), json.loads(json.dumps(depends or {}))
    changed = sorted(k for k in set(saved_depends) | set(given_depends) if saved_depends.get(k) != given_depends.get(k))
    if changed:
        raise BdlensError(
            f"{run_dir} was started with a different {' and '.join(changed)}; resume with the same one(s), or start over with --overwrite"
        )
    return state


def restore(state: dict[str, Any], dist_info: Distributed, **stateful: Any) -> tuple[int, float]:
    """Resume from a :func:`read_state` dict: each keyword's object (model, optimiser, scheduler) gets
    ``load_state_dict(state[key])``, this rank gets its RNG states back (the CUDA one only on a GPU:
    :func:`~bdlens.training.distributed.set_rng_states`); returns (step, elapsed seconds).
    A run must resume on as many processes as it was saved from (each rank has its own RNG stream)."""
    saved_ranks = len(state["torch_rng"])
    if saved_ranks != dist_info.world_size:
        raise BdlensError(f"the run was saved from {saved_ranks} process(es); resume it on as many (now {dist_info.world_size})")
    for key, obj in stateful.items():
        try:
            obj.load_state_dict(state[key])
        except (KeyError, RuntimeError, ValueError) as err:  # a state of another model: one line, not a traceback
            raise BdlensError(f"the saved {key} does not match this run's ({type(err).__name__}); start over with --overwrite") from None
    set_rng_states(state, dist_info)
    return int(state["step"]), float(state["elapsed"])
