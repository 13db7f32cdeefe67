"""Shipping a trained checkpoint in the package (``bdlens train bundle``).

Every kind of checkpoint has one row in :data:`LOADERS` (the function that must load it before it
is bundled); a new kind adds a row, not a branch.
"""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bdlens.checkpoint import BUNDLED_DIR, load_weights, read_manifest, save_checkpoint
from bdlens.configs import portable_path
from bdlens.errors import BdlensError
from bdlens.outputs import foreign_files, partial_path, prepare_output, replace_with

BUNDLE_KIND = "bundled checkpoint"
#: Every file of a bundled checkpoint (the bundles ship without an output marker: this layout is how
#: --overwrite recognises one).
BUNDLE_LAYOUT = ("manifest.json", "*.safetensors")
# kind → "module:function" that loads a checkpoint of that kind (imported on use).
LOADERS = {
    "deterministic": "bdlens.models.pretrained:load_trained",
    "vi": "bdlens.bayes.posterior:load_posterior",
    "perturbation": "bdlens.perturbation.learned:load_perturbation",
    "diffusion": "bdlens.models.diffusion:load_diffusion",
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
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise BdlensError(f"bundle name {name!r} must be letters, digits and underscores (e.g. det_6h)")
    manifest = read_manifest(checkpoint)
    target = BUNDLED_DIR / name
    if target.exists() and not overwrite:
        raise BdlensError(f"bundled checkpoint {name} exists; pass --overwrite to replace it")
    prepare_output(target, BUNDLE_KIND, overwrite, inputs=[checkpoint], flag="--name", layout=BUNDLE_LAYOUT, required=("manifest.json",),
                   clear=False)
    # Refuse to bundle anything that does not load.
    kind = manifest.get("kind")
    _load(kind, checkpoint)
    manifest = {**manifest, **(extra or {}), "bundled_from": portable_path(checkpoint)}
    manifest.pop("bdlens_version", None)
    # Built beside the target and swapped in whole: nothing of a replaced bundle lingers, and an
    # interrupted bundling leaves the old bundle intact (and a partial that the next bundling removes).
    staging = partial_path(target)
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
    # Companion files (a posterior's ρ) travel along; anything else does not.
    skipped = written | set(foreign_files(checkpoint, BUNDLE_LAYOUT))
    for extra_file in sorted(checkpoint.iterdir()):
        if extra_file.is_file() and extra_file.name not in skipped:
            shutil.copyfile(extra_file, staging / extra_file.name)
    replace_with(staging, target)
    return target


def _share_prior_mean(checkpoint: Path, name: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """A VI posterior's ρ without its prior mean, and the bundled deterministic checkpoint that holds it."""
    from bdlens.bayes.posterior import without_bundled_prior_mean

    bundles = {
        p.name: p for p in BUNDLED_DIR.iterdir()
        if p.name != name and not p.name.startswith(".") and (p / "manifest.json").is_file() and read_manifest(p).get("kind") == "deterministic"
    }
    return without_bundled_prior_mean(checkpoint, bundles)
