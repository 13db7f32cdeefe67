"""The deterministic demo models shipped in the package: provenance and a skill sanity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bdlens.checkpoint import BUNDLED_DIR, bundled_checkpoint
from bdlens.data import open_dataset
from bdlens.ensemble.rollout import deterministic_forecast
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.models.pretrained import load_trained


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
