"""The resumable training state (``state.pt``) shared by the trainers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bdlens.errors import BdlensError

STATE = "state.pt"


def read_training_state(run_dir: Path, config: BaseModel, what: str) -> dict[str, Any]:
    """``run_dir/state.pt`` (read with ``weights_only=True``) after checking it was written with ``config``.

    ``what`` names the config in the error (e.g. "training", "perturbation").
    """
    path = run_dir / STATE
    if not path.is_file():
        raise BdlensError(f"nothing to resume in {run_dir} (no {STATE}); start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if json.loads(state["config"]) != json.loads(config.model_dump_json()):
        raise BdlensError(f"{run_dir} was started with a different {what} config; resume with the same config")
    return state
