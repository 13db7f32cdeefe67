"""Shipping a trained checkpoint in the package (``bdlens train bundle``), and composing a mixture
posterior from trained checkpoints (``bdlens train modes``).

Every kind of checkpoint has one row in :data:`LOADERS` (the function that must load it before it
is bundled); a new kind adds a row, not a branch.

``--float16`` stores a posterior's Bayesian tensors (μ, the modes, ρ, the prior mean) in half
precision, which halves its size. The rounding moves a weight by at most 2⁻¹¹ of its magnitude; a
location tensor (μ or a mode) is rounded only where that stays below :data:`ROUNDING_LIMIT` of the
weight's posterior σ everywhere, else kept in float32 (measured per bundle and recorded in the
manifest's ``storage``), so it changes no distribution that the posterior stands for; the model
still computes in float32.
"""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def bundle(checkpoint: str | Path, name: str, extra: dict | None = None, overwrite: bool = False, float16: bool = False) -> Path:
    """Copy a trained checkpoint into the package's bundled models as ``name``.

    ``extra`` is merged into the manifest (e.g. the test-period scores that justified bundling).
    An existing bundle is only replaced with ``overwrite``. ``float16`` (VI posteriors only) stores
    the Bayesian tensors in half precision (module docstring).
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
    if float16 and kind != "vi":
        raise BdlensError(f"--float16 is for VI posteriors (their σ bounds what rounding changes); {checkpoint} holds a {kind!r} checkpoint")
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
    if float16:
        _to_float16(staging)
    replace_with(staging, target)
    return target


#: A location tensor whose float16 rounding would move some weight by more than this many σ stays float32.
ROUNDING_LIMIT = 0.1


def _to_float16(directory: Path) -> None:
    """Store the Bayesian tensors of the posterior in ``directory`` in float16; record the rounding in its manifest."""
    from bdlens.bayes.posterior import MODE, MODES, POSTERIOR_WEIGHTS, PRIOR_MEAN

    manifest = read_manifest(directory)
    names = manifest["posterior"]["names"]
    modes = [MODE.format(c) for c in range(1, len(manifest["posterior"].get(MODES) or []) + 1)]
    weights, extra = load_file(directory / "model.safetensors"), load_file(directory / POSTERIOR_WEIGHTS)
    rounded, kept = [], []
    for table, key, n in [(weights, n, n) for n in names] + [(extra, m + n, n) for m in modes for n in names]:
        ratio = ((table[key].double() - table[key].half().double()).abs() / torch.nn.functional.softplus(extra[f"rho.{n}"].double())).flatten()
        # A few tensors (layer-norm gains near 1 with a small σ) would move by a sizeable part of σ: those stay exact.
        if float(ratio.max()) > ROUNDING_LIMIT:
            kept.append(key)
            continue
        table[key] = table[key].half()
        rounded.append(ratio.numpy())
    extra.update({k: v.half() for k, v in extra.items() if k.startswith(("rho.", PRIOR_MEAN))})
    save_file(extra, directory / POSTERIOR_WEIGHTS)
    rounding = np.concatenate(rounded)
    manifest.pop("bdlens_version", None)
    manifest["storage"] = {"dtype": "float16", "tensors": "μ, modes, ρ and the prior mean", "float32": kept, "rounding_over_sigma": {
        "median": float(np.median(rounding)), "p99.9": float(np.quantile(rounding, 0.999)), "max": float(rounding.max())}}
    save_checkpoint(directory, weights, manifest)


def add_modes(source: str | Path, modes: list[Path], out: str | Path, command: str, overwrite: bool = False) -> Path:
    """Write the VI posterior at ``source`` with the weights of the deterministic checkpoints ``modes``
    as further modes (:func:`bdlens.bayes.with_modes`) to the checkpoint directory ``out``.

    The modes must have the posterior's configuration (the same model trained again, e.g. with
    another seed); each keeps the normalisation statistics it was trained with (``mode_norm_stats``
    in the manifest), and the ensemble normalises its members' inputs and outputs with them."""
    from bdlens.bayes.posterior import load_posterior, save_posterior, with_modes
    from bdlens.models.pretrained import load_trained

    source, out = Path(source), Path(out)
    prepare_output(out, "posterior checkpoint", overwrite, inputs=[source, *modes], layout=BUNDLE_LAYOUT, required=("manifest.json",),
                   clear=False)
    bayes, manifest = load_posterior(source)
    trained = [load_trained(m) for m in modes]
    for path, model in zip(modes, trained, strict=True):
        if model.manifest.get("data_config", {}).get("splits") != manifest.get("data_config", {}).get("splits"):
            raise BdlensError(f"mode {path} was trained on other data splits than {source}; train it with the posterior's data config")
    mixture = with_modes(bayes, [t.model for t in trained], [portable_path(m) for m in modes])
    keep = {k: v for k, v in manifest.items() if k not in ("bdlens_version", "kind", "version", "model_config", "posterior", "norm_stats")}
    keep["mode_norm_stats"] = [t.manifest["norm_stats"] for t in trained]
    keep["modes"] = {"command": command, "from": portable_path(source)}
    staging = partial_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    save_posterior(mixture, staging, manifest["norm_stats"], keep)
    replace_with(staging, out)
    return out


def _share_prior_mean(checkpoint: Path, name: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """A VI posterior's ρ without its prior mean, and the bundled deterministic checkpoint that holds it."""
    from bdlens.bayes.posterior import without_bundled_prior_mean

    bundles = {
        p.name: p for p in BUNDLED_DIR.iterdir()
        if p.name != name and not p.name.startswith(".") and (p / "manifest.json").is_file() and read_manifest(p).get("kind") == "deterministic"
    }
    return without_bundled_prior_mean(checkpoint, bundles)
