"""The demo models shipped in the package: unchanged outputs, provenance, and skill recomputed on the small world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundled_reference import NAMES, REFERENCE, bundled_outputs

from bdlens.checkpoint import read_manifest
from bdlens.data import open_dataset
from bdlens.errors import BdlensError
from bdlens.forecast import deterministic_forecast
from bdlens.grid import lat_weights
from bdlens.models.pretrained import BUNDLED_DIR, bundled_checkpoint, load_trained


@pytest.mark.parametrize("name", NAMES)
def test_bundled_network_outputs_are_unchanged(name: str) -> None:
    """The bundles predate the ``convention`` field: their manifests resolve to the legacy token layout
    and the networks give the outputs recorded before the backbone moved to Pangu's (tests/bundled_reference.py)."""
    torch.set_num_threads(1)
    reference = np.load(REFERENCE)
    for key, value in bundled_outputs(name).items():
        np.testing.assert_allclose(value, reference[key], rtol=1e-5, atol=1e-5 * np.abs(reference[key]).max(), err_msg=key)


@pytest.mark.parametrize("name", ["det_6h", "det_24h", "vi_6h", "vi_24h", "perturb_6h"])
def test_every_bundle_loads_as_a_legacy_model(name: str) -> None:
    from bdlens.bayes import load_posterior
    from bdlens.perturbation.learned import load_perturbation

    directory = bundled_checkpoint(name)
    loader = {"vi": lambda d: load_posterior(d)[0].config, "perturb": lambda d: load_perturbation(d)[0].config}.get(
        name.split("_")[0], lambda d: load_trained(d).model.config
    )
    assert "convention" not in read_manifest(directory)["model_config"]
    assert loader(directory).convention == "legacy"


@pytest.mark.parametrize("name", ["det_6h", "det_24h"])
def test_bundled_model_has_its_provenance(name: str) -> None:
    model = load_trained(bundled_checkpoint(name))
    training = model.manifest["training"]
    assert training["command"].startswith("bdlens train deterministic --config train_det_")
    assert training["seed"] == 0 and training["config"]["steps"] > 0
    assert model.manifest["validation"]["geopotential_500"] < model.manifest["validation"]["persistence/geopotential_500"]
    assert model.manifest["test_scores"]["checks"]["z500"]["beats_persistence_6h_to_10d"]
    assert model.step_hours == int(name.removeprefix("det_").removesuffix("h"))


def test_package_stays_small() -> None:
    size = sum(p.stat().st_size for p in BUNDLED_DIR.rglob("*") if p.is_file())
    assert size < 30 * 2**20


def test_unknown_bundle_is_a_clear_error() -> None:
    with pytest.raises(BdlensError, match="no bundled checkpoint 'nope'.*det_6h"):
        bundled_checkpoint("nope")


def test_bundled_models_beat_persistence_on_the_small_world(small_world: Path) -> None:
    truth = open_dataset(small_world / "truth.zarr").load()
    analysis = open_dataset(small_world / "analysis.zarr").load()
    models = {h: load_trained(bundled_checkpoint(f"det_{h}h")) for h in (6, 24)}
    inits = truth.time.values[4:40:8]
    fc = deterministic_forecast(models, analysis, inits, [6, 24, 48])
    weights = lat_weights(truth.latitude.values)[:, None]
    for lead in (6, 24, 48):
        valid = inits + np.timedelta64(lead, "h")
        z_true = truth.geopotential.sel(level=500, time=valid).values
        z_model = fc.geopotential.sel(level=500, prediction_timedelta=np.timedelta64(lead, "h")).values
        z_persist = analysis.geopotential.sel(level=500, time=inits).values
        rmse = lambda f: float(np.sqrt(np.mean((f - z_true) ** 2 * weights)))  # noqa: E731
        assert rmse(z_model) < rmse(z_persist), lead


@pytest.mark.parametrize("name", ["vi_6h", "vi_24h"])
def test_bundled_posterior_has_its_provenance(name: str) -> None:
    from bdlens.bayes import load_posterior

    bayes, manifest = load_posterior(bundled_checkpoint(name))
    assert manifest["training"]["command"].startswith("bdlens train vi --from runs/det_")
    assert manifest["test_scores"]["pass"] is True
    assert max(max(r) for r in manifest["test_scores"]["ratio_posterior_mean_to_deterministic"].values()) <= 1.02
    assert float(bayes.posterior.sigma.min()) > 0


def test_bundled_posterior_spread_grows_far_outside_the_training_distribution(small_world: Path) -> None:
    import torch

    from bdlens.bayes import PosteriorEnsemble, load_posterior

    bayes, _ = load_posterior(bundled_checkpoint("vi_6h"))
    det = load_trained(bundled_checkpoint("det_6h"))
    analysis = open_dataset(small_world / "analysis.zarr")
    times = analysis.time.values[8:12]
    previous = det.layout.normalise(det.layout.to_tensors(analysis.sel(time=times - np.timedelta64(6, "h"))), det.stats)
    current = det.layout.normalise(det.layout.to_tensors(analysis.sel(time=times)), det.stats)
    ensemble = PosteriorEnsemble(bayes, 8, seed=0)
    spreads = {}
    with torch.no_grad():
        for shift in (0.0, 8.0):  # inputs shifted by 8 standard deviations: far outside the training data
            upper, _ = ensemble.step((previous.upper + shift, previous.surface + shift), (current.upper + shift, current.surface + shift))
            spreads[shift] = float(upper.std(0).mean())
    assert spreads[8.0] > 2.0 * spreads[0.0]


def test_bundled_perturbation_network_is_calibrated_and_traceable() -> None:
    import json

    from bdlens.perturbation.learned import load_perturbation

    directory = bundled_checkpoint("perturb_6h")
    network, manifest = load_perturbation(directory)
    assert manifest["kind"] == "perturbation"
    assert manifest["training"]["command"].startswith("bdlens train perturb --from bdlens/assets/models/vi_6h")
    calibration = json.loads((directory / "calibration.json").read_text())
    assert calibration["after"]["crps"] <= calibration["before"]["crps"] * 1.01
    assert abs(calibration["after"]["spread_skill"] - 1) <= abs(calibration["before"]["spread_skill"] - 1) + 1e-9
