"""A forecast system on disk: the step models, perturbation networks and calibration the engine composes.

``--checkpoint`` (or :meth:`bdlens.ensemble.Forecaster.from_pretrained`) names either one checkpoint
directory (a ``bdlens train`` output) or a directory of them (the bundled demo models,
``bdlens/assets/models``, or a folder of runs). Every checkpoint is recognised by its manifest's
``kind`` (``deterministic``, ``vi``, ``perturbation``) and step length. An optional ``ensemble.json``
beside them holds the system's calibration and defaults (written by ``bdlens calibrate``):

    {"default_perturbation": "sppt", "default_weights": 10,
     "schemes": {"sppt": {"amplitude": 1.2, "temperature": 1.5}, "none": {"temperature": 2.0},
                 "learned": {"amplitude": 0.9, "temperature": 2.0, "networks": {"6": "perturb_6h"}}, ...}}

A calibration applies to every step model of the rollout (docs/ensemble.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bdlens.checkpoint import MANIFEST, WEIGHTS, read_manifest
from bdlens.errors import BdlensError

SYSTEM_FILE = "ensemble.json"
#: A scheme's calibration for the deterministic weights, inside its entry (docs/ensemble.md): the
#: posterior's epistemic spread takes part of the error, so the scheme alone needs more amplitude.
WITHOUT_POSTERIOR = "without_posterior"
KINDS = ("deterministic", "vi", "perturbation", "diffusion")


@dataclass
class System:
    """The checkpoints of a system by kind and step hours, its calibration and where it came from."""

    root: Path
    checkpoints: dict[str, dict[int, Path]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> dict[str, Path]:
        """Every checkpoint by directory name (schemes refer to networks by name)."""
        return {p.name: p for by_step in self.checkpoints.values() for p in by_step.values()}

    def scheme(self, name: str, bayes: bool = True) -> dict[str, Any]:
        """The calibrated settings of perturbation ``name`` ({} when uncalibrated: amplitude and temperature 1):
        with the posterior weights (``bayes``) or with the deterministic ones, whose calibration, when the
        scheme has one of its own (``without_posterior``), overrides the other's entries."""
        settings = dict(self.settings.get("schemes", {}).get(name, {}))
        own = settings.pop(WITHOUT_POSTERIOR, None)
        if not bayes and own is not None:
            settings.update(own)
        if name == "learned" and "networks" not in settings:
            settings["networks"] = {str(s): str(p) for s, p in self.checkpoints["perturbation"].items()}
        return settings

    def modes(self) -> int:
        """The most mixture components C of the system's VI posteriors (1 without modes; docs/science.md §4)."""
        return max([1] + [1 + len(read_manifest(p).get("posterior", {}).get("modes") or []) for p in self.checkpoints["vi"].values()])

    def train_period(self) -> tuple[np.datetime64, np.datetime64]:
        """(start, end) of the training split the system's step models were trained on (their manifests' data config)."""
        for kind in ("deterministic", "vi", "diffusion"):
            for path in self.checkpoints[kind].values():
                split = (read_manifest(path).get("data_config") or {}).get("splits", {}).get("train")
                if split:
                    return np.datetime64(split["start"]), np.datetime64(split["end"])
        raise BdlensError(f"no checkpoint under {self.root} names its training period (data_config.splits.train in its manifest)")

    def hashes(self, kinds: tuple[str, ...]) -> dict[str, str]:
        """sha256 of the weights of every checkpoint of ``kinds`` (provenance in the forecast's metadata)."""
        out = {}
        for kind in kinds:
            for path in self.checkpoints[kind].values():
                digest = hashlib.sha256()
                for name in sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors"):
                    digest.update((path / name).read_bytes())
                out[path.name] = digest.hexdigest()
        return out


def _step_hours(manifest: dict[str, Any], path: Path) -> int:
    try:
        return int(manifest["model_config"]["step_hours"])
    except (KeyError, TypeError, ValueError):
        raise BdlensError(f"{path / MANIFEST} has no model_config.step_hours; it is not a complete bdlens checkpoint") from None


def load_system(path: str | Path) -> System:
    """Read the checkpoints under ``path`` (one checkpoint or a directory of them) and its ``ensemble.json``."""
    root = Path(path)
    if not root.is_dir():
        raise BdlensError(f"--checkpoint {root} is not a directory; pass a checkpoint or a folder of checkpoints (e.g. a bundle)")
    candidates = [root] if (root / MANIFEST).is_file() else sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    # A run directory holds its checkpoint one level down.
    candidates += [p / "checkpoint" for p in ([root] + sorted(root.iterdir())) if (p / "checkpoint" / MANIFEST).is_file()]
    found: dict[str, dict[int, Path]] = {kind: {} for kind in KINDS}
    for cand in candidates:
        manifest = read_manifest(cand)
        kind = manifest.get("kind")
        if kind not in KINDS:
            raise BdlensError(f"{cand} holds a {kind!r} checkpoint; the ensemble needs deterministic, vi, perturbation or diffusion checkpoints")
        if not (cand / WEIGHTS).is_file():
            raise BdlensError(f"{cand} has no {WEIGHTS}; the checkpoint is incomplete")
        step = _step_hours(manifest, cand)
        if step in found[kind]:
            raise BdlensError(f"{root} holds two {kind} checkpoints for {step} h ({found[kind][step].name}, {cand.name}); keep one")
        found[kind][step] = cand
    if not found["deterministic"] and not found["vi"] and not found["diffusion"]:
        raise BdlensError(f"{root} holds no deterministic, vi or diffusion checkpoint; pass a `bdlens train` output or a bundle")
    settings: dict[str, Any] = {}
    if (root / SYSTEM_FILE).is_file():
        try:
            settings = json.loads((root / SYSTEM_FILE).read_text())
        except json.JSONDecodeError as err:
            raise BdlensError(f"{root / SYSTEM_FILE} is corrupted ({err.msg}); rerun `bdlens calibrate` or delete it") from None
    return System(root, found, settings)
