"""`bdlens train bundle`: what goes into the package, and how a posterior shares its prior mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)

import bdlens.checkpoint as checkpoint
import bdlens.models.pretrained as pretrained
import bdlens.training.bundle as training_bundle
from bdlens.bayes.posterior import POSTERIOR_WEIGHTS, PosteriorSettings, from_deterministic, load_posterior, save_posterior
from bdlens.errors import BdlensError
from bdlens.training.config import load_train_config
from bdlens.training.deterministic import train


def test_posterior_bundle_names_the_deterministic_bundle_that_holds_its_prior_mean(tiny_setup: Path, tmp_path: Path,  # noqa: F811
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (checkpoint, training_bundle):
        monkeypatch.setattr(module, "BUNDLED_DIR", tmp_path / "assets")
    (tmp_path / "assets").mkdir()
    cfg, _ = load_train_config(tiny_setup / "train.yaml")
    det = train(cfg, tmp_path / "det")
    trained = pretrained.load_trained(det)
    bayes = from_deterministic(trained.model, PosteriorSettings(init_sigma_scale=1e-2))
    with torch.no_grad():
        bayes.posterior.mu.add_(0.01)  # a learned μ: the prior mean (the pretrained weights) is no longer μ
    save_posterior(bayes, tmp_path / "vi", trained.stats.to_dict(), {"kind_note": "test"})
    assert any(k.startswith("prior_mean.") for k in load_file(tmp_path / "vi" / POSTERIOR_WEIGHTS))

    alone = training_bundle.bundle(tmp_path / "vi", "vi_alone")  # no deterministic bundle yet: the prior mean stays
    assert any(k.startswith("prior_mean.") for k in load_file(alone / POSTERIOR_WEIGHTS))

    old = training_bundle.bundle(tmp_path / "vi", "vi_tiny")
    (old / "extra.safetensors").write_text("")  # a file of the bundle layout that the new bundle does not have
    training_bundle.bundle(det, "det_tiny")
    with pytest.raises(BdlensError, match="--overwrite"):
        training_bundle.bundle(tmp_path / "vi", "vi_tiny")
    (old / "notes.txt").write_text("mine")
    with pytest.raises(BdlensError, match="notes.txt"):  # a file bdlens did not write is never deleted
        training_bundle.bundle(tmp_path / "vi", "vi_tiny", overwrite=True)
    (old / "notes.txt").unlink()
    shared = training_bundle.bundle(tmp_path / "vi", "vi_tiny", overwrite=True)
    assert not any(k.startswith("prior_mean.") for k in load_file(shared / POSTERIOR_WEIGHTS))
    assert (shared / POSTERIOR_WEIGHTS).stat().st_size < 0.6 * (alone / POSTERIOR_WEIGHTS).stat().st_size
    assert not (shared / "extra.safetensors").exists()  # a replaced bundle is replaced whole
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == ["det_tiny", "vi_alone", "vi_tiny"]  # no partial left
    loaded, manifest = load_posterior(shared)
    assert manifest["posterior"]["prior_mean_bundle"] == "det_tiny"
    for name in ("mu", "rho", "prior_loc"):
        assert torch.equal(getattr(loaded.posterior, name), getattr(bayes.posterior, name)), name
    assert torch.equal(loaded.posterior.kl(), bayes.posterior.kl())
