"""Loading trained 3DEST checkpoints, including the demo models bundled with the package."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bdlens.checkpoint import load_state_into, load_weights, read_manifest
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.models.config import ModelConfig
from bdlens.models.transformer import EarthSpecificTransformer
from bdlens.outputs import foreign_files, partial_path, prepare_output, replace_with

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
BUNDLE_KIND = "bundled checkpoint"
#: Every file of a bundled checkpoint (the bundles ship without an output marker: this layout is how
#: --overwrite recognises one). "calibration.json" is the perturbation layer's companion file.
BUNDLE_LAYOUT = ("manifest.json", "*.safetensors", "calibration.json")


@dataclass
class TrainedModel:
    """A 3DEST with what it needs to run on physical fields: its layout and normalisation statistics."""

    model: EarthSpecificTransformer
    layout: FieldLayout
    stats: NormStats
    manifest: dict
    source: Path

    @property
    def step_hours(self) -> int:
        """Δ of this model in hours."""
        return self.model.config.step_hours

    @torch.no_grad()
    def step(self, previous: Fields | None, current: Fields) -> Fields:
        """X_{t+Δ} from (X_{t−Δ}, X_t) in physical units; states are ``Fields`` with a batch dim."""
        norm = lambda f: None if f is None else self.layout.normalise(f, self.stats)  # noqa: E731
        upper, surface = self.model.step(norm(previous), norm(current))
        return self.layout.denormalise(Fields(upper, surface), self.stats)


def bundled_checkpoint(name: str) -> Path:
    """Directory of a demo checkpoint shipped in the package (e.g. ``det_6h``)."""
    path = BUNDLED_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in BUNDLED_DIR.iterdir() if not p.name.startswith(".")) if BUNDLED_DIR.is_dir() else []
        raise BdlensError(f"no bundled checkpoint {name!r} (bundled: {', '.join(known) or 'none'})")
    return path


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a deterministic checkpoint directory (``bdlens train deterministic`` output) in eval mode."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") != "deterministic":
        raise BdlensError(f"{path} holds a {manifest.get('kind')!r} checkpoint; a deterministic one is needed here")
    try:
        config = ModelConfig.model_validate(manifest["model_config"])
        stats = NormStats.from_dict(manifest["norm_stats"])
    except (KeyError, ValueError) as err:
        raise BdlensError(f"{path}: manifest lacks a valid model_config or norm_stats ({err}); retrain or restore it") from err
    model = EarthSpecificTransformer(config)
    load_state_into(model, load_weights(path), path)
    model.to(device).eval()
    grid = next((g for g in GRIDS.values() if (g.nlat, g.nlon) == (config.nlat, config.nlon)), None)
    if grid is None:
        raise BdlensError(f"{path}: model grid {config.nlon}x{config.nlat} is not a supported grid")
    layout = FieldLayout(config.upper_variables, config.levels, config.surface_variables, grid)
    return TrainedModel(model, layout, stats, manifest, path)


def bundle(checkpoint: str | Path, name: str, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Copy a trained checkpoint into the package's bundled models as ``name``.

    ``extra`` is merged into the manifest (e.g. the test-period scores that justified bundling).
    An existing bundle is only replaced with ``overwrite``.
    """
    from bdlens.checkpoint import save_checkpoint

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
    if kind == "vi":
        from bdlens.bayes import load_posterior

        load_posterior(checkpoint)
    elif kind == "perturbation":
        from bdlens.perturbation.learned import load_perturbation

        load_perturbation(checkpoint)
    else:
        load_trained(checkpoint)
    manifest = {**manifest, **(extra or {}), "bundled_from": str(checkpoint)}
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
    # Companion files (a posterior's ρ, a calibration.json) travel along; anything else does not.
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
