"""Learned perturbation network: fair-CRPS loss, initial state, frozen backbone, training, resume, noise, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from interrupt import stop_after_saving
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)
from torch.utils.data import default_collate

import bdlens.training.loop as loop
from bdlens.bayes.posterior import PosteriorSettings, from_deterministic, save_posterior
from bdlens.checkpoint import save_checkpoint
from bdlens.cli import main
from bdlens.configs import portable_path
from bdlens.data import make_datasets
from bdlens.data.splits import load_data_config
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.metrics import crps
from bdlens.models import EarthSpecificTransformer, ModelConfig
from bdlens.perturbation.learned import PerturbationNetwork, State, load_perturbation
from bdlens.streams import generator as stream_generator
from bdlens.training.ensemble_validation import fair_crps
from bdlens.training.perturbation import (
    CurriculumSettings,
    EnsembleCRPSLoss,
    PerturbConfig,
    PerturbedEnsemble,
    curriculum_rollout,
    rollout_loss,
    train_perturbation,
    validate_perturbation,
)


@pytest.fixture(scope="module")
def world(tiny_setup: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """A VI posterior (random tiny backbone, σ_q = 1 % of each weight's RMS) saved like `bdlens train vi`, and its data."""
    root = tmp_path_factory.mktemp("perturb")
    config = ModelConfig.from_yaml(tiny_setup / "model.yaml").model_copy(update={"drop_path": 0.0})
    torch.manual_seed(0)
    bayes = from_deterministic(EarthSpecificTransformer(config), PosteriorSettings(init_sigma_scale=1e-2))
    data_config = load_data_config(tiny_setup / "data.yaml")
    sets = make_datasets(data_config, data_path=tiny_setup / "data.zarr", splits=["train", "val"], in_memory=True)
    extra = {"data_config": json.loads(data_config.model_dump_json()), "training": {"data_path": str(tiny_setup / "data.zarr")}}
    save_posterior(bayes, root / "vi", sets["train"].stats.to_dict(), extra)
    return {"bayes": bayes, "train": sets["train"], "val": sets["val"], "vi": root / "vi", "config": config}


def perturb_config(**training) -> PerturbConfig:
    return PerturbConfig.model_validate({
        "network": {"embed_dim": 8, "depths": [1, 1, 1, 1], "heads": [1, 1, 1, 1], "init_sigma": 0.02},
        "training": {"steps": 4, "members": 3, "batch_size": 2, "learning_rate": 1e-2, "warmup_steps": 0, "log_every": 1,
                     "checkpoint_every": 2, "validate_every": 0, "curriculum": {"steps_per_stage": 2, "max_rollout": 2}} | training,
        "validation": {"members": 3, "leads": [1, 2], "max_forecasts": 2, "batch_size": 2},
    })


def network(world: dict, **settings) -> PerturbationNetwork:
    cfg = perturb_config().network.model_copy(update=settings)
    torch.manual_seed(1)
    return PerturbationNetwork(cfg.model_config_for(world["config"]), cfg.init_sigma, cfg.init_scale)


def test_fair_crps_loss_matches_bdlens_metrics() -> None:
    rng = np.random.default_rng(0)
    ens, truth = rng.normal(size=(5, 3, 7)), rng.normal(size=(3, 7))
    reference = crps(xr.DataArray(ens, dims=("number", "a", "b")), xr.DataArray(truth, dims=("a", "b")), dims=())
    x = torch.tensor(ens, requires_grad=True)
    ours = fair_crps(x, torch.tensor(truth))
    np.testing.assert_allclose(ours.detach().numpy(), reference.values, rtol=1e-12)
    ours.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The weighted loss is the latitude-/variable-weighted mean of the same pointwise CRPS.
    lat = np.linspace(-60, 60, 4)
    loss_fn = EnsembleCRPSLoss(lat, ["temperature"], ["2m_temperature"], surface_factor=0.5)
    upper, surface = torch.randn(4, 1, 1, 2, 4, 3), torch.randn(4, 1, 1, 4, 3)
    tu, ts = torch.randn(1, 1, 2, 4, 3), torch.randn(1, 1, 4, 3)
    w = torch.as_tensor(lat_weights(lat), dtype=torch.float32)[:, None]
    expected = 1.5 * (fair_crps(upper, tu) * w).mean() + 0.5 * 3.0 * (fair_crps(surface, ts) * w).mean()
    torch.testing.assert_close(loss_fn((upper, surface), (tu, ts)), expected)


def test_initial_network_is_a_small_unbiased_perturbation(world: dict) -> None:
    net = network(world, init_sigma=0.03)
    x = world["train"][0][0][-1]
    mu, sigma = net(x.upper[None, None], x.surface[None, None])
    for m, s in zip(mu, sigma, strict=True):
        assert m.abs().max() < 0.5 * 0.03 and m.abs().mean() < 0.2 * 0.03  # |μ| ≪ σ
        torch.testing.assert_close(s, torch.full_like(s, 0.03), rtol=0.15, atol=0)


def test_gradients_reach_the_perturbation_network_only(world: dict) -> None:
    bayes, net = world["bayes"], network(world)
    bayes.requires_grad_(False)
    (previous, current), target = world["train"][0]
    batch = lambda f: tuple(x[None] for x in f)  # noqa: E731
    loss_fn = EnsembleCRPSLoss(world["train"].layout.grid.latitudes(), world["config"].upper_variables, world["config"].surface_variables)
    ensemble = PerturbedEnsemble(bayes, net, 3, seed=5)
    loss = rollout_loss(ensemble, loss_fn, batch(previous), batch(current), [batch(target), batch(world["train"][1][1])])
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["net.embed.upper.weight"].abs().sum() > 0 and grads["net.recovery.upper.bias"].abs().sum() > 0
    assert all(p.grad is None for p in bayes.parameters())


def test_member_noise_and_forecast_do_not_depend_on_the_batch(world: dict) -> None:
    bayes, net = world["bayes"], network(world)
    (previous, current), _ = world["val"][0]
    batch = lambda f: tuple(x[None] for x in f)  # noqa: E731
    with torch.no_grad():
        four = PerturbedEnsemble(bayes, net, 4, seed=9)
        alone = PerturbedEnsemble(bayes, net, [2], seed=9)
        for step in (0, 3):
            for a, b in zip(four.noise([0], batch(current), step), alone.noise([0], batch(current), step), strict=True):
                assert torch.equal(a[2], b[0])
        out4 = four.step(batch(previous), batch(current))
        out1 = alone.step(batch(previous), batch(current))
        out4b = four.step(batch(current), out4)
        out1b = alone.step(batch(current), out1)
    for a, b in zip(out4 + out4b, out1 + out1b, strict=True):
        torch.testing.assert_close(a[2], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out4[0][0], out4[0][1])  # members differ
    # a new rollout from the shared analysis restarts the noise streams: same forecast again
    with torch.no_grad():
        again = four.step(batch(previous), batch(current))
    torch.testing.assert_close(again[0], out4[0], rtol=0, atol=0)


def test_forecast_noise_is_keyed_by_init_not_by_batch(world: dict) -> None:
    bayes, net, val = world["bayes"], network(world), world["val"]
    keys = {1: 262968, 2: 262974, 3: -6}  # init times in hours since 1970 (the last before 1970)
    samples = {t: val[i][0] for t, i in ((1, 0), (2, 1), (3, 2))}

    def forecast(inits: list[int], seed: int = 9, members=3) -> list[State]:
        """Two steps of a start()-ed ensemble from the analyses of ``inits``: [(K, B, …) per step]."""
        previous, current = default_collate([samples[t] for t in inits])
        ensemble = PerturbedEnsemble(bayes, net, members, seed)
        ensemble.start([keys[t] for t in inits])
        with torch.no_grad():
            one = ensemble.step(tuple(previous), tuple(current))
            return [one, ensemble.step(tuple(current), one)]

    with_t1, alone, with_t3 = forecast([1, 2]), forecast([2]), forecast([2, 3])
    for a, b, c in zip(with_t1, alone, with_t3, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            # Other inits in the batch change the backbone's matmul blocking only: float32 round-off.
            torch.testing.assert_close(x[:, 1], y[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(z[:, 0], y[:, 0], rtol=1e-5, atol=1e-5)
    member = forecast([2], members=[1])  # and member 1 computed alone
    torch.testing.assert_close(member[1][0][0], alone[1][0][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(forecast([2])[1][0], alone[1][0])  # same seed, same forecast
    assert not torch.allclose(forecast([2], seed=10)[1][0], alone[1][0])

    # The noise itself: member k of the forecast keyed i at step s is N(0, 1) from the generator of (seed, k, s, i).
    ensemble, like = PerturbedEnsemble(bayes, net, 2, seed=9), tuple(x[None] for x in samples[1][1])
    upper, surface = ensemble.noise([keys[1], keys[3]], like, 4)
    size = upper[0, 0].numel()
    for k in range(2):
        for b, key in enumerate((keys[1], keys[3])):
            generator = stream_generator(9, "learned-perturbation", k, 4, key)
            draw = torch.randn(size + surface[0, 0].numel(), generator=generator, dtype=torch.float64).float()
            torch.testing.assert_close(upper[k, b].flatten(), draw[:size], rtol=0, atol=0)
            torch.testing.assert_close(surface[k, b].flatten(), draw[size:], rtol=0, atol=0)
    other_key, other_step = ensemble.noise([keys[2]], like, 4)[0], ensemble.noise([keys[1]], like, 5)[0]
    assert not torch.allclose(other_key[0, 0], upper[0, 0]) and not torch.allclose(other_step[0, 0], upper[0, 0])
    assert not torch.allclose(ensemble.noise([-keys[3]], like, 4)[0][0, 0], upper[0, 1])  # a key and its negation differ
    ensemble.start([keys[1]])
    with pytest.raises(BdlensError, match="1 init keys were given for a batch of 2"):
        ensemble.step(*default_collate([samples[1], samples[2]]))


def test_curriculum_goes_from_one_to_max_rollout() -> None:
    settings = CurriculumSettings(steps_per_stage=3, max_rollout=4)
    assert [curriculum_rollout(s, settings) for s in range(14)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4]


def test_training_reduces_crps_and_writes_a_checkpoint(world: dict, tmp_path: Path) -> None:
    config = perturb_config(steps=40, validate_every=40, curriculum={"steps_per_stage": 20, "max_rollout": 2})
    config = config.model_copy(update={"network": config.network.model_copy(update={"init_sigma": 0.1})})
    torch.manual_seed(config.training.seed)
    untrained = PerturbationNetwork(config.network.model_config_for(world["config"]), config.network.init_sigma, config.network.init_scale)
    before = validate_perturbation(world["bayes"], untrained, world["val"], config.validation)
    checkpoint = train_perturbation(world["bayes"], world["train"], config, tmp_path / "run", world["val"], norm_stats={"key": "k"})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in records if "loss" in r] == [1] * 20 + [2] * 20
    after = [r for r in records if r.get("split") == "val"]
    assert [r["lead_steps"] for r in after] == [1, 2]
    for b, a in zip(before, after, strict=True):  # measured: CRPS −2…−6 % (the spread moves either way on this random backbone)
        assert a["crps"] < 0.985 * b["crps"]
    net, manifest = load_perturbation(checkpoint)
    assert manifest["kind"] == "perturbation" and manifest["step"] == 40 and manifest["norm_stats"] == {"key": "k"}
    assert manifest["model_config"]["embed_dim"] == 8 and manifest["validation"][0]["crps"] == after[0]["crps"]


def test_resume_is_exact(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = perturb_config()
    stats = {"key": "k"}
    straight = train_perturbation(world["bayes"], world["train"], config, tmp_path / "straight", norm_stats=stats)
    stop_after_saving(monkeypatch, loop, 2)
    with pytest.raises(KeyboardInterrupt):
        train_perturbation(world["bayes"], world["train"], config, tmp_path / "partial", norm_stats=stats)
    monkeypatch.undo()
    resumed = train_perturbation(world["bayes"], world["train"], config, tmp_path / "partial", norm_stats=stats, resume=True)
    a, _ = load_perturbation(straight)
    b, _ = load_perturbation(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)
    losses = lambda run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses("partial") == losses("straight")


def test_cli_trains_from_a_vi_checkpoint_and_refuses_a_deterministic_one(world: dict, tmp_path: Path, capsys) -> None:
    config = perturb_config(steps=2, validate_every=2).model_dump(mode="json")
    (tmp_path / "perturb.yaml").write_text(json.dumps(config))
    args = ["-q", "train", "perturb", "--config", str(tmp_path / "perturb.yaml"), "--out", str(tmp_path / "run")]
    assert main([*args, "--from", str(world["vi"])]) == 0
    _, manifest = load_perturbation(tmp_path / "run" / "checkpoint")
    assert manifest["backbone_checkpoint"] == portable_path(world["vi"]) and manifest["norm_stats"]["key"] == world["train"].stats.key
    capsys.readouterr()
    assert main([*args, "--from", str(world["vi"])]) == 2  # an existing run is neither overwritten nor resumed silently
    assert "--resume" in capsys.readouterr().err
    det = save_checkpoint(tmp_path / "det", {}, {"kind": "deterministic"})
    assert main([*args[:-1], str(tmp_path / "other"), "--from", str(det)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a VI posterior" in err and "bdlens train vi" in err


def test_ddp_two_processes_train_like_one_process_with_the_whole_batch(world: dict, tmp_path: Path) -> None:
    """Same weight samples on both ranks and noise keyed by sample: two ranks with half the batch each
    end where one process with the whole batch ends (up to float rounding), and identical to each other."""
    config = perturb_config(steps=3, batch_size=4, checkpoint_every=3).model_dump(mode="json")
    (tmp_path / "perturb.yaml").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["-m", "bdlens", "-q", "train", "perturb", "--from", str(world["vi"]), "--config", str(tmp_path / "perturb.yaml"), "--out"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, str(tmp_path / "ddp")]
    for cmd in (ddp, [sys.executable, *args, str(tmp_path / "one")]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "ranks" in r] == [{"ranks": 2, "max_weight_difference_between_ranks": 0.0}]
    two, _ = load_perturbation(tmp_path / "ddp" / "checkpoint")
    one, _ = load_perturbation(tmp_path / "one" / "checkpoint")
    start = network(world, **config["network"])
    moved = 0.0
    for (name, a), b, c in zip(two.state_dict().items(), one.state_dict().values(), start.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # Adam turns rounding into ~1e-6
        moved = max(moved, float((b - c).abs().max()))
    assert moved > 1e-3  # training did move the weights, 100× more than the tolerance
    single = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx([r["loss"] for r in single if "loss" in r], rel=1e-5)


