"""Model checkpoints: a directory with ``model.safetensors`` (weights) and ``manifest.json``.

The manifest carries everything needed to rebuild and use the model (its ``model_config``, the
``norm_stats`` of the data it was trained on) and its provenance (command, config, seed, training
time, validation scores). Weights are read with safetensors: no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

log = logging.getLogger(__name__)


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write weights and manifest into directory ``path`` (files replaced atomically).

    Other files there (a ``calibration.json``, notes) are kept; since they may describe the weights
    being replaced, they are named in a warning. Temporary files have fixed names, so one left by a
    killed process is overwritten by the next save.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kept = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".safetensors")
                  and p.name != MANIFEST)
    if kept and (path / WEIGHTS).exists():
        log.warning("%s: kept %s beside the re-saved checkpoint; check they still fit the new weights", path, ", ".join(kept))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / WEIGHTS)
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"bdlens_version": __version__, **manifest}, indent=1, default=str))
    tmp.replace(path / MANIFEST)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, with a clear error when it is not one."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BdlensError(f"{path} is not a bdlens checkpoint (no {MANIFEST}); pass a directory written by `bdlens train`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BdlensError(f"{path / MANIFEST} is corrupted ({err}); restore or retrain the checkpoint") from err
    if not isinstance(manifest, dict):
        raise BdlensError(f"{path / MANIFEST} is not a JSON object; restore or retrain the checkpoint")
    return manifest


def require_fields(manifest: dict[str, Any], path: str | Path, fields: tuple[str, ...]) -> None:
    """Raise a one-line :class:`BdlensError` if checkpoint ``path``'s ``manifest`` lacks one of
    ``fields`` (dotted for nested ones, e.g. ``posterior.names``)."""
    for dotted in fields:
        tree: Any = manifest
        for key in dotted.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is None:
            raise BdlensError(f"{Path(path) / MANIFEST} lacks the field {dotted}; restore the checkpoint or retrain it with this bdlens")


def checkpoint_hash(path: str | Path) -> str:
    """SHA-256 (hex) over checkpoint directory ``path``'s manifest and ``*.safetensors`` files, names
    and contents: what a run that starts from this checkpoint depends on (companion files such as a
    ``calibration.json`` do not count)."""
    path = Path(path)
    read_manifest(path)  # a clear error when it is not a checkpoint
    digest = hashlib.sha256()
    for file in sorted([path / MANIFEST, *path.glob("*.safetensors")]):
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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
        known = sorted(p.name for p in BUNDLED_DIR.iterdir() if not p.name.startswith(".")) if BUNDLED_DIR.is_dir() else []
        raise BdlensError(f"no bundled checkpoint {name!r} (bundled: {', '.join(known) or 'none'})")
    return path
