"""Diffusion baseline (docs/science.md §8): preconditioning, σ schedule, Heun sampler on an analytic Gaussian,
network-evaluation count, adaptive layer norm, training on the one loop, members independent of the batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from interrupt import stop_after_saving
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)

import bdlens.training.loop as loop
from bdlens.checkpoint import load_weights, read_manifest
from bdlens.cli import main
from bdlens.data import Fields, make_datasets
from bdlens.data.splits import load_data_config
from bdlens.ensemble.base import Forecast, MemberSource
from bdlens.ensemble.diffusion import DiffusionMembers
from bdlens.errors import BdlensError
from bdlens.models import EarthSpecificTransformer, ModelConfig
from bdlens.models.diffusion import EDMSettings, SamplerSettings, heun_sample, loss_weight, preconditioning, sigma_schedule
from bdlens.models.lead_time import Call, rollout
from bdlens.training.config import load_train_config
from bdlens.training.diffusion import DiffusionConfig, train_diffusion


def test_preconditioning_gives_unit_variance_inputs_and_targets() -> None:
    """EDM's derivation (Karras et al. 2022, App. B.6), checked numerically for σ_d = 1 and 0.5: with
    y of variance σ_d² and x = y + σn, c_in·x and the effective target (y − c_skip x)/c_out have unit
    variance, c_skip minimises that target's variance, λ = 1/c_out², c_noise = ¼ ln σ."""
    for sigma_data in (1.0, 0.5):
        sigma = torch.tensor([0.002, 0.03, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
        torch.testing.assert_close(c_in**2 * (sigma_data**2 + sigma**2), torch.ones_like(sigma))
        target_variance = lambda skip: (sigma_data**2 * (1 - skip) ** 2 + skip**2 * sigma**2) / c_out**2  # noqa: E731
        torch.testing.assert_close(target_variance(c_skip), torch.ones_like(sigma))
        for nudge in (-1e-3, 1e-3):  # any other skip weight gives the network a larger target
            assert bool((target_variance(c_skip + nudge) > 1).all())
        torch.testing.assert_close(loss_weight(sigma, sigma_data), 1 / c_out**2)
        torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    c_skip, c_out, c_in, _ = preconditioning(torch.tensor([1.0]))
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((0.5, 1 / math.sqrt(2), 1 / math.sqrt(2)))


def test_sigma_schedule_endpoints_and_monotonicity() -> None:
    settings = SamplerSettings()
    sigmas = sigma_schedule(settings).numpy()
    assert len(sigmas) == settings.steps + 1 == 21
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.03) and sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)
    i = 7  # docs/science.md §8 written out
    expected = (80 ** (1 / 7) + i / 19 * (0.03 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_min"):
        SamplerSettings(sigma_min=5.0, sigma_max=1.0)


def _gaussian_denoiser(mean: torch.Tensor, std: torch.Tensor):
    """The exact denoiser of N(mean, std²) data: E[y | y + σn = x] = (std² x + σ² mean)/(std² + σ²)."""
    return lambda x, sigma: (std**2 * x + sigma**2 * mean) / (std**2 + sigma**2)


@pytest.mark.parametrize(("churn", "inflation"), [(0.0, {20: 0.035, 100: 0.003}), (20.0, {20: 0.08, 100: 0.01})])
def test_heun_sampler_draws_the_gaussian_of_an_analytic_denoiser(churn: float, inflation: dict[int, float]) -> None:
    """Samples of a Gaussian (mean, std per element) from its exact denoiser have that mean and std.

    Tolerances: 4 standard errors of the 40 000-sample estimates, plus the sampler's own error, which
    shrinks with N: Heun's discretisation inflates the std by 2–3 % at N = 20 without churn and by
    6–7 % with churn 20 (measured; 0.05 % and 0.5 % at N = 100), and starting from N(0, σ_max²)
    instead of N(mean, σ_max² + std²) biases the mean by −mean·std/σ_max (≤ 1 % of the mean here)."""
    mean = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    std = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    n = 40_000
    for steps in (20, 100):
        generator = torch.Generator().manual_seed(1)
        settings = SamplerSettings(steps=steps, churn=churn)
        samples, _ = heun_sample(_gaussian_denoiser(mean, std), lambda: torch.randn(n, 3, generator=generator, dtype=torch.float64), settings)
        se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
        assert bool(((samples.mean(0) - mean).abs() <= 4 * se_mean + 0.01 * mean.abs()).all()), samples.mean(0)
        assert bool(((samples.std(0) - std).abs() <= 4 * se_std + inflation[steps] * std).all()), samples.std(0)


@pytest.mark.parametrize(("steps", "churn"), [(2, 0.0), (5, 0.0), (20, 0.0), (20, 40.0)])
def test_network_evaluations_are_2n_minus_1_per_sample(steps: int, churn: float) -> None:
    calls = []

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return torch.zeros_like(x)

    settings = SamplerSettings(steps=steps, churn=churn)
    _, counted = heun_sample(denoise, lambda: torch.randn(4, 2), settings)
    assert counted == len(calls) == 2 * steps - 1 == settings.network_evaluations
    assert min(calls) == pytest.approx(0.03)  # σ = 0 itself is never evaluated


def test_adaptive_layer_norm_starts_as_the_plain_block_and_then_follows_the_noise_level() -> None:
    base = dict(upper_variables=["geopotential"], levels=[500, 850], surface_variables=["2m_temperature"], grid="64x32",
                n_input_times=1, embed_dim=8, depths=[1, 1, 1, 1], heads=[1, 2, 2, 1], window=[2, 4, 8], patch=[2, 4, 4])
    plain = EarthSpecificTransformer(ModelConfig.model_validate(base)).eval()
    conditioned = EarthSpecificTransformer(ModelConfig.model_validate(base | {"conditioning_dim": 4})).eval()
    state = conditioned.state_dict()
    # the same backbone weights (the plain norms' affine maps are still the identity); the modulations stay at zero
    state.update({k: v for k, v in plain.state_dict().items() if k in state})
    conditioned.load_state_dict(state)
    upper, surface = torch.randn(2, 1, 1, 2, 32, 64), torch.randn(2, 1, 1, 32, 64)
    with torch.no_grad():
        reference = plain(upper, surface)
        a = conditioned(upper, surface, conditioning=torch.randn(2, 4))
        for name, p in conditioned.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.1)
        b = conditioned(upper, surface, conditioning=torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        c = conditioned(upper, surface, conditioning=torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    torch.testing.assert_close(a, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c[0][0], b[0][0])  # each sample follows its own conditioning …
    assert not torch.allclose(c[0][1], b[0][1], atol=1e-3)  # … and only its own
    with pytest.raises(BdlensError, match="conditioning vector"):
        conditioned(upper, surface)
    with pytest.raises(BdlensError, match="n_input_times must be 1 or 2"):
        ModelConfig.from_dict(base | {"n_input_times": 3})


@pytest.fixture(scope="module")
def diffusion_config(tiny_setup: Path) -> Path:  # noqa: F811
    """The tiny deterministic training config plus EDM, a 3-level sampler and a 2-member validation."""
    raw = yaml.safe_load((tiny_setup / "train.yaml").read_text())
    raw |= {"edm": {"embedding_dim": 8}, "sampler": {"steps": 3}, "validation": {"members": 2, "leads": [1, 2], "batch_size": 2},
            "val_samples": 2, "val_every": 4}
    path = tiny_setup / "diffusion.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def trained(diffusion_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg, path = load_train_config(diffusion_config, DiffusionConfig)
    return train_diffusion(cfg, tmp_path_factory.mktemp("diffusion") / "run", config_file=path, command="test")


def test_training_writes_a_checkpoint_with_validation_and_cost(trained: Path) -> None:
    manifest = read_manifest(trained)
    assert manifest["kind"] == "diffusion" and manifest["edm"]["embedding_dim"] == 8 and manifest["sampler"]["steps"] == 3
    assert manifest["model_config"]["n_input_times"] == 2 and manifest["model_config"]["conditioning_dim"] == 0  # the forecast model's
    assert set(manifest["residual_stats"]["std"]) == set(manifest["norm_stats"]["std"])
    rows = manifest["validation"]
    assert [r["lead_steps"] for r in rows] == [1, 2] and all(r["network_evaluations_per_member_step"] == 5 for r in rows)
    assert all(r["crps"] > 0 and r["spread"] > 0 and r["seconds_per_member_step"] > 0 for r in rows)
    assert "rmse_geopotential_500" in rows[0] and rows[1]["spread"] > rows[0]["spread"]


def test_resume_is_exact(diffusion_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = load_train_config(diffusion_config, DiffusionConfig)
    cfg = cfg.model_copy(update={"val_every": 100})  # validation is rank-0 bookkeeping; resume does not depend on it
    straight = load_weights(train_diffusion(cfg, tmp_path / "straight"))
    stop_after_saving(monkeypatch, loop, 2)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(cfg, tmp_path / "partial")
    monkeypatch.undo()
    resumed = load_weights(train_diffusion(cfg, tmp_path / "partial", resume=True))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    losses = lambda run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses("partial") == losses("straight")


def test_member_i_does_not_depend_on_the_batch(trained: Path, tiny_setup: Path) -> None:  # noqa: F811
    """Through the engine's protocol and rollout: member 2 of a 4-member batch equals member 2 alone at
    every lead, a rerun is identical, and other members and other inits differ."""
    sets = make_datasets(load_data_config(tiny_setup / "data.yaml"), data_path=tiny_setup / "data.zarr", splits=["val"], in_memory=True)
    val = sets["val"]
    (previous, current), _ = torch.utils.data.default_collate([val[0]])
    analysis = {-6: val.layout.denormalise(Fields(*previous), val.stats), 0: val.layout.denormalise(Fields(*current), val.stats)}
    source = DiffusionMembers(trained, seed=7, sampler=SamplerSettings(steps=3))
    assert isinstance(source, MemberSource) and source.network_evaluations == 5 and source.steps == (6,) and source.n_input_times == 2

    def run(members: tuple[int, ...], init_key: int = 100) -> dict[int, Fields]:
        source.start(Forecast(init_key, members))
        history = source.initial({h: Fields(*(x.expand(len(members), *x.shape[1:]) for x in f)) for h, f in analysis.items()})
        return dict(rollout({6: source.step}, history, [6, 12], two_times=True, with_call=True))

    four, alone, again, other = run((0, 1, 2, 3)), run((2,)), run((2,)), run((2,), init_key=101)
    for lead in (6, 12):
        for a, b, c in zip(four[lead], alone[lead], again[lead], strict=True):
            torch.testing.assert_close(a[2], b[0], rtol=1e-5, atol=1e-2)  # physical units (1e-2 m/s, K, Pa): batched matmuls round differently
            torch.testing.assert_close(c, b, rtol=0, atol=0)
        assert not torch.allclose(four[lead].upper[0], four[lead].upper[1])  # members differ
        assert not torch.allclose(other[lead].upper, alone[lead].upper)  # and so do forecasts from other inits
    with pytest.raises(BdlensError, match="steps 6 h, not 24 h"):
        source.step(analysis[-6], analysis[0], Call(step=24, lead=24, current=0, previous=-24))


def test_cli_trains_diffusion_and_refuses_to_reuse_a_run(diffusion_config: Path, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["-q", "train", "diffusion", "--config", str(diffusion_config), "--out", str(tmp_path / "run")]
    raw = yaml.safe_load(diffusion_config.read_text()) | {"steps": 2, "warmup_steps": 1, "val_every": 100}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw))
    args[4] = str(tmp_path / "d.yaml")
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw | {"sampler": {"steps": 1}}))
    assert main([*args[:4], str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "other")]) == 2
    assert "sampler.steps" in capsys.readouterr().err and not (tmp_path / "other").exists()
    from bdlens import checkpoint
    from bdlens.training import bundle

    for module in (checkpoint, bundle):  # a diffusion checkpoint can be bundled like the others
        monkeypatch.setattr(module, "BUNDLED_DIR", tmp_path / "assets")
    assert main(["-q", "train", "bundle", str(tmp_path / "run" / "checkpoint"), "--name", "diffusion_tiny"]) == 0
    assert (tmp_path / "assets" / "diffusion_tiny" / "model.safetensors").read_bytes() == (
        tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    from bdlens.ensemble.diffusion import DiffusionMembers

    members = DiffusionMembers(tmp_path / "assets" / "diffusion_tiny", seed=0)  # the engine reads the sampler back from JSON
    assert members.network_evaluations == 2 * raw["sampler"].get("steps", 20) - 1


def test_edm_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        EDMSettings(embedding_dim=1)
