"""Shipping a trained checkpoint in the package (``bdlens train bundle``).

Every kind of checkpoint has one row in :data:`LOADERS` (the function that must load it before it
is bundled); a new kind adds a row, not a branch.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bdlens.checkpoint import BUNDLED_DIR, load_weights, read_manifest, save_checkpoint
from bdlens.configs import portable_path
from bdlens.errors import BdlensError

# kind → "module:function" that loads a checkpoint of that kind (imported on use).
LOADERS = {
    "deterministic": "bdlens.models.pretrained:load_trained",
    "vi": "bdlens.bayes.posterior:load_posterior",
    "perturbation": "bdlens.perturbation.learned:load_perturbation",
}


def _load(kind: str, checkpoint: Path) -> None:
    if kind not in LOADERS:
        raise BdlensError(f"{checkpoint} holds a {kind!r} checkpoint; bdlens can bundle: {', '.join(LOADERS)}")
    module, function = LOADERS[kind].split(":")
    getattr(importlib.import_module(module), function)(checkpoint)


def bundle(checkpoint: str | Path, name: str, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Copy a trained checkpoint into the package's bundled models as ``name``.

    ``extra`` is merged into the manifest (e.g. the test-period scores that justified bundling).
    An existing bundle is only replaced with ``overwrite``.
    """
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    target = BUNDLED_DIR / name
    if target.exists() and not overwrite:
        raise BdlensError(f"bundled checkpoint {name} exists; pass --overwrite to replace it")
    # Refuse to bundle anything that does not load.
    kind = manifest.get("kind")
    _load(kind, checkpoint)
    manifest = {**manifest, **(extra or {}), "bundled_from": portable_path(checkpoint)}
    manifest.pop("bdlens_version", None)
    # Built beside the target and swapped in whole: nothing of a replaced bundle lingers, and an
    # interrupted bundling leaves the old bundle intact.
    staging = BUNDLED_DIR / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    written = {"model.safetensors", "manifest.json"}
    shared = _share_prior_mean(checkpoint, name) if kind == "vi" else None
    if shared is not None:
        from bdlens.bayes.posterior import POSTERIOR_WEIGHTS, PRIOR_MEAN_BUNDLE

        tensors, prior_bundle = shared
        manifest["posterior"] = {**manifest["posterior"], PRIOR_MEAN_BUNDLE: prior_bundle}
        staging.mkdir(parents=True)
        save_file(tensors, staging / POSTERIOR_WEIGHTS)
        written.add(POSTERIOR_WEIGHTS)
    save_checkpoint(staging, load_weights(checkpoint), manifest)
    # Companion files (a posterior's ρ, a calibration.json) travel along; training state does not.
    for extra_file in sorted(checkpoint.iterdir()):
        if extra_file.is_file() and extra_file.name not in written and extra_file.suffix != ".pt":
            shutil.copyfile(extra_file, staging / extra_file.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _share_prior_mean(checkpoint: Path, name: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """A VI posterior's ρ without its prior mean, and the bundled deterministic checkpoint that holds it."""
    from bdlens.bayes.posterior import without_bundled_prior_mean

    bundles = {
        p.name: p for p in BUNDLED_DIR.iterdir()
        if p.name not in (name, f".{name}.tmp") and (p / "manifest.json").is_file() and read_manifest(p).get("kind") == "deterministic"
    }
    return without_bundled_prior_mean(checkpoint, bundles)
