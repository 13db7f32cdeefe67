"""Model checkpoints: a directory with ``model.safetensors`` (weights) and ``manifest.json``.

The manifest carries everything needed to rebuild and use the model (its ``model_config``, the
``norm_stats`` of the data it was trained on) and its provenance (command, config, seed, training
time, validation scores). Weights are read with safetensors: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bdlens import __version__
from bdlens.errors import BdlensError

WEIGHTS = "model.safetensors"
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "models"
MANIFEST = "manifest.json"


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write weights and manifest into directory ``path`` (files replaced atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path / f".{WEIGHTS}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    tmp.replace(path / WEIGHTS)
    tmp = path / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"bdlens_version": __version__, **manifest}, indent=1, default=str))
    tmp.replace(path / MANIFEST)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, with a clear error when it is not one."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BdlensError(f"{path} is not a bdlens checkpoint (no {MANIFEST}); pass a directory written by `bdlens train`")
    try:
        return json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise BdlensError(f"{path / MANIFEST} is corrupted ({err.msg}); restore or retrain the checkpoint") from err


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint directory ``path`` (safetensors; never unpickled)."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise BdlensError(f"{path} has no {WEIGHTS}; the checkpoint is incomplete")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise BdlensError(f"{weights} is corrupted ({err}); restore or retrain the checkpoint") from err


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)`` with a one-line error naming what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if names
        )
        raise BdlensError(f"checkpoint {source} does not match the model configuration ({detail})")
    model.load_state_dict(state)


def bundled_checkpoint(name: str) -> Path:
    """Directory of a demo checkpoint shipped in the package (e.g. ``det_6h``)."""
    path = BUNDLED_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in BUNDLED_DIR.iterdir()) if BUNDLED_DIR.is_dir() else []
        raise BdlensError(f"no bundled checkpoint {name!r} (bundled: {', '.join(known) or 'none'})")
    return path
