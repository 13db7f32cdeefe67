"""Posteriors with modes (a tied-σ mixture around independently trained models): which component each
weight sample belongs to, that a member with σ = 0 *is* its mode's model run with that model's own
normalisation statistics, the file format, `bdlens train modes` and float16 bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bayes_posterior import deterministic
from test_models_transformer import inputs
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)

import bdlens.checkpoint as checkpoint
import bdlens.training.bundle as training_bundle
from bdlens.bayes.posterior import (
    MODE,
    POSTERIOR_WEIGHTS,
    PosteriorSettings,
    from_deterministic,
    load_posterior,
    save_posterior,
    with_modes,
)
from bdlens.bayes.sampling import forward_members, sample_weights
from bdlens.cli import main
from bdlens.data import open_dataset
from bdlens.ensemble.rollout import deterministic_forecast, posterior_forecast
from bdlens.errors import BdlensError
from bdlens.models.pretrained import load_trained
from bdlens.training.config import load_train_config
from bdlens.training.deterministic import train


@pytest.fixture(scope="module")
def mixture():
    single = from_deterministic(deterministic(0), PosteriorSettings(init_sigma_scale=0.05))
    return single, with_modes(single, [deterministic(1), deterministic(2)], ["seed1", "seed2"])


def test_sample_k_is_drawn_around_mode_k_mod_c_with_the_single_gaussians_noise(mixture) -> None:
    single, mix = mixture
    post = mix.posterior
    assert post.components == 3 and single.posterior.components == 1
    modes = [post.mu.detach(), *(torch.cat([m.get_parameter(n).detach().reshape(-1) for n in post.names]) for m in (deterministic(1), deterministic(2)))]
    draws, reference = sample_weights(mix, 7, seed=4), sample_weights(single, 7, seed=4)
    for k in range(7):
        # θ_k − m_{k mod C} is exactly the single posterior's σ ε_k: the same stream, the same σ
        torch.testing.assert_close(draws[k] - modes[k % 3], reference[k] - single.posterior.mu.detach(), rtol=0, atol=1e-7)
    assert torch.equal(sample_weights(mix, [5, 1], seed=4), draws[[5, 1]])  # independent of which others are drawn
    assert torch.equal(sample_weights(mix, [4, 2], seed=4, temperature=0.0), torch.stack([modes[1], modes[2]]))
    # σ, the prior and the KL are those of the component at μ, which VI trained
    assert torch.equal(post.kl(), single.posterior.kl())


def test_members_with_sigma_zero_are_their_modes_models(mixture) -> None:
    _, mix = mixture
    zero = with_modes(from_deterministic(deterministic(0), PosteriorSettings(init_sigma_scale=0.05)), [deterministic(1), deterministic(2)], ["a", "b"])
    with torch.no_grad():
        zero.posterior.rho.fill_(-torch.inf)
        upper, surface, _ = inputs(zero.config, batch=2)
        out = forward_members(zero, sample_weights(zero, 6, seed=0), upper, surface)
        for k in range(6):
            reference = deterministic(k % 3)(upper, surface)  # an ordinary module with mode k mod 3's weights
            for got, want in zip(out, reference, strict=True):
                torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def test_modes_survive_save_and_load_and_a_missing_mode_is_an_error(mixture, tmp_path: Path) -> None:
    _, mix = mixture
    save_posterior(mix, tmp_path, norm_stats={"key": "abc"})
    assert json.loads((tmp_path / "manifest.json").read_text())["posterior"]["modes"] == ["seed1", "seed2"]
    loaded, _ = load_posterior(tmp_path)
    assert torch.equal(loaded.posterior.modes, mix.posterior.modes) and loaded.posterior.mode_sources == ["seed1", "seed2"]
    assert torch.equal(sample_weights(loaded, 5, seed=2), sample_weights(mix, 5, seed=2))
    tensors = load_file(tmp_path / POSTERIOR_WEIGHTS)
    save_file({k: v for k, v in tensors.items() if not k.startswith(MODE.format(2))}, tmp_path / POSTERIOR_WEIGHTS)
    with pytest.raises(BdlensError, match="lacks the weights of mode 2"):
        load_posterior(tmp_path)


def test_a_mode_must_be_the_same_architecture(mixture) -> None:
    single, _ = mixture
    with pytest.raises(BdlensError, match="another model configuration"):
        with_modes(single, [deterministic(1, convention="legacy")], ["legacy"])
    with pytest.raises(BdlensError, match="one source per mode"):
        with_modes(single, [deterministic(1)], [])


@pytest.fixture(scope="module")
def trained_modes(tiny_setup: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """Two tiny deterministic models (seeds 3, 4) and a σ = 0 posterior around the first."""
    root = tmp_path_factory.mktemp("modes")
    cfg, _ = load_train_config(tiny_setup / "train.yaml")
    paths = {f"det{s}": train(cfg.model_copy(update={"seed": s}), root / f"run{s}") for s in (3, 4)}
    # Mode 1 was "trained" with other statistics, as two trainings of the demo are (each estimates them
    # from its own sample): its forecasts are only right if its inputs are normalised with them.
    manifest = json.loads((paths["det4"] / "manifest.json").read_text())
    manifest["norm_stats"]["std"] = {k: (np.asarray(v) * 1.3).tolist() for k, v in manifest["norm_stats"]["std"].items()}
    manifest["norm_stats"]["mean"] = {k: (np.asarray(v) + 0.2 * np.asarray(manifest["norm_stats"]["std"][k])).tolist()
                                      for k, v in manifest["norm_stats"]["mean"].items()}
    (paths["det4"] / "manifest.json").write_text(json.dumps(manifest))
    trained = load_trained(paths["det3"])
    bayes = from_deterministic(trained.model, PosteriorSettings())
    with torch.no_grad():
        bayes.posterior.rho.fill_(-torch.inf)
    save_posterior(bayes, root / "vi", trained.stats.to_dict(), {"kind_note": "σ = 0", "data_config": trained.manifest["data_config"]})
    return {**paths, "vi": root / "vi", "root": root, "data": tiny_setup / "data.zarr"}


def test_train_modes_members_forecast_as_their_models_do_with_their_own_statistics(trained_modes: dict[str, Path]) -> None:
    out = trained_modes["root"] / "vi_modes"
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["det4"]), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode_norm_stats"] == [json.loads((trained_modes["det4"] / "manifest.json").read_text())["norm_stats"]]
    assert manifest["posterior"]["modes"] == [str(trained_modes["det4"])] and "command" in manifest["modes"]
    data = open_dataset(trained_modes["data"])
    inits, leads = data.time.values[[4, 9]], [6, 12, 18]
    det = {s: load_trained(trained_modes[s]) for s in ("det3", "det4")}
    ens = posterior_forecast({6: out}, det["det3"].layout, data, inits, leads, members=4)
    for k in range(4):
        reference = deterministic_forecast({6: det["det3" if k % 2 == 0 else "det4"]}, data, inits, leads)
        for name in reference.data_vars:
            np.testing.assert_allclose(ens[name].isel(number=k).values, reference[name].values, rtol=1e-4, atol=1e-4 * float(np.abs(reference[name]).max()))
    # and not by accident: mode 1 with the posterior's statistics is another forecast
    assert not np.allclose(ens["temperature"].isel(number=1).values, ens["temperature"].isel(number=0).values, rtol=1e-3)


def test_train_modes_refuses_bad_input_before_writing(trained_modes: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = trained_modes["root"] / "refused"
    assert main(["train", "modes", "--from", str(trained_modes["det3"]), "--modes", str(trained_modes["det4"]), "--out", str(out)]) == 2
    assert "not a VI posterior" in capsys.readouterr().err and not out.exists()
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["vi"]), "--out", str(out)]) == 2
    assert "deterministic one is needed" in capsys.readouterr().err and not out.exists()
    # an input is never the output
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["det4"]), "--out", str(trained_modes["det4"]),
                 "--overwrite"]) == 2
    assert (trained_modes["det4"] / "model.safetensors").is_file()
    # an existing output is kept; the refusal offers --overwrite only (the command has no --resume)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["det4"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err and "--resume" not in err, err
    assert (out / "notes.txt").read_text() == "mine"


def test_float16_bundle_halves_the_posterior_and_rounds_far_below_sigma(trained_modes: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (checkpoint, training_bundle):
        monkeypatch.setattr(module, "BUNDLED_DIR", tmp_path / "assets")
    (tmp_path / "assets").mkdir()
    trained = load_trained(trained_modes["det3"])
    bayes = with_modes(from_deterministic(trained.model, PosteriorSettings(init_sigma_scale=1e-2)), [load_trained(trained_modes["det4"]).model], ["det4"])
    save_posterior(bayes, tmp_path / "vi", trained.stats.to_dict())
    full = training_bundle.bundle(tmp_path / "vi", "vi_full")
    half = training_bundle.bundle(tmp_path / "vi", "vi_half", float16=True)
    assert (half / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size
    assert (half / POSTERIOR_WEIGHTS).stat().st_size < 0.75 * (full / POSTERIOR_WEIGHTS).stat().st_size  # ρ all half, the mode partly
    loaded, manifest = load_posterior(half)
    post = bayes.posterior
    assert loaded.posterior.mu.dtype == torch.float32
    assert torch.equal(loaded.posterior.rho, post.rho.detach().half().float())
    sigma = post.unflatten(post.sigma.detach())
    kept, brute = set(manifest["storage"]["float32"]), []
    for prefix, got, want in (("", loaded.posterior.mu, post.mu.detach()), (MODE.format(1), loaded.posterior.modes[0], post.modes[0])):
        for name, g, w in zip(post.names, post.unflatten(got).values(), post.unflatten(want).values(), strict=True):
            ratio = (w - w.half().float()).abs() / sigma[name]
            # a tensor is rounded where that moves no weight by more than the limit's share of its σ, else kept exact
            assert (prefix + name in kept) == bool(ratio.max() > training_bundle.ROUNDING_LIMIT), prefix + name
            assert torch.equal(g, w if prefix + name in kept else w.half().float())
            brute += [] if prefix + name in kept else [ratio.flatten()]
    assert kept and len(kept) < len(post.names)  # the tiny model has both kinds
    rounding, brute = manifest["storage"]["rounding_over_sigma"], torch.cat(brute)
    assert rounding["max"] == pytest.approx(float(brute.max()), rel=1e-5) and rounding["max"] <= training_bundle.ROUNDING_LIMIT
    assert rounding["median"] == pytest.approx(float(brute.median()), rel=1e-3, abs=1e-9)
    with pytest.raises(BdlensError, match="--float16 is for VI posteriors"):
        training_bundle.bundle(trained_modes["det3"], "det_half", float16=True)


def test_default_weight_count_draws_every_mode_equally_often(trained_modes: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from bdlens.ensemble import Forecaster

    system = tmp_path / "system"
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["det4"]), str(trained_modes["det4"]),
                 str(trained_modes["det4"]), "--out", str(system / "vi")]) == 0
    shutil.copytree(trained_modes["det3"], system / "det")
    (system / "ensemble.json").write_text(json.dumps({"default_weights": 10}))
    forecaster = Forecaster.from_pretrained(system, device="cpu")
    assert forecaster.system.modes() == 4
    # the largest divisor of the members up to 10 that is a multiple of C = 4, else the largest divisor
    assert [forecaster.default_weights(m, True) for m in (100, 16, 10, 7)] == [4, 8, 10, 7]
    assert forecaster.default_weights(100, False) == 1


def test_the_perturbation_trainer_refuses_a_posterior_with_modes(trained_modes: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    modes = tmp_path / "vi_modes"
    assert main(["train", "modes", "--from", str(trained_modes["vi"]), "--modes", str(trained_modes["det4"]), "--out", str(modes)]) == 0
    capsys.readouterr()
    out = tmp_path / "perturb"
    assert main(["train", "perturb", "--from", str(modes), "--config", "perturb_demo", "--out", str(out), "--world", str(trained_modes["data"])]) == 2
    assert "posterior with modes" in capsys.readouterr().err and not out.exists()
