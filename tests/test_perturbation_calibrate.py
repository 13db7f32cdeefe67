"""Calibration: recovers a known spread on a toy problem, its scores agree with bdlens.metrics, CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import xarray as xr
from test_perturbation_learned import perturb_config, world  # noqa: F401  (tiny VI posterior and its data)
from test_training import tiny_setup  # noqa: F401
from torch.utils.data import default_collate

from bdlens.cli import main
from bdlens.errors import BdlensError
from bdlens.metrics import crps, spread_skill_ratio
from bdlens.perturbation.calibrate import CalibrationConfig, SPPTEnsemble, calibrate, objective
from bdlens.perturbation.learned import PerturbedEnsemble
from bdlens.perturbation.sppt import SPPT, load_sppt_config
from bdlens.training.ensemble_validation import ensemble_scores, fair_crps


def toy(true_spread: float, base_spread: float = 1.0, n: int = 20000, k: int = 8):
    """evaluate(a, T) for members m + a·T·base_spread·ε against truth m + true_spread·η (fixed draws)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    truth = mean + true_spread * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(k, n, generator=g, dtype=torch.float64)

    def evaluate(a: float, t: float) -> dict:
        ens = mean + a * t * base_spread * eps
        variance, mse = ens.var(0, correction=1).mean(), (ens.mean(0) - truth).square().mean()
        return {"crps": float(fair_crps(ens, truth).mean()), "spread_skill": math.sqrt(variance / mse * (k + 1) / k)}

    return evaluate


@pytest.mark.parametrize("true_spread", [0.3, 2.0])
def test_calibration_recovers_a_known_spread(true_spread: float) -> None:
    config = CalibrationConfig(amplitude={"low": 0.05, "high": 10.0, "xatol": 0.005})
    result = calibrate(toy(true_spread), config)
    assert result["amplitude"] == pytest.approx(true_spread, rel=0.04)
    assert result["temperature"] == 1.0 and result["after"]["spread_skill"] == pytest.approx(1.0, abs=0.04)
    assert result["after"]["crps"] < result["before"]["crps"]
    assert result["after"]["objective"] == objective(result["after"]["crps"], result["after"]["spread_skill"], 1.0)
    assert len(result["history"]) <= 1 + config.amplitude.max_evaluations


def test_temperature_only_calibration_picks_the_grid_value_that_fits() -> None:
    config = CalibrationConfig(temperature={"tune": True, "values": [1.0, 2.0, 4.0, 8.0]})
    result = calibrate(toy(2.0, base_spread=0.5), config, tune_amplitude=False)  # spread 0.5·T: T = 4 fits
    assert (result["amplitude"], result["temperature"]) == (1.0, 4.0)
    assert [r["temperature"] for r in result["history"]] == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(BdlensError, match="nothing to calibrate"):
        calibrate(toy(1.0), CalibrationConfig(), tune_amplitude=False)


def test_scores_agree_with_bdlens_metrics(world: dict) -> None:  # noqa: F811
    bayes, val = world["bayes"], world["val"]
    rows = ensemble_scores(PerturbedEnsemble(bayes, None, 3, seed=0), val, [1], max_forecasts=2, batch_size=2)
    # The same two forecasts by hand, as DataArrays (number, time, channel, latitude, longitude).
    (prev, cur), target = default_collate([val[i] for i in (0, len(val) - 1)])
    with torch.no_grad():
        out = PerturbedEnsemble(bayes, None, 3, seed=0).step(tuple(prev), tuple(cur))
    forecast = torch.cat([out[0].flatten(2, 3), out[1]], dim=2).numpy()
    truth = torch.cat([target[0].flatten(1, 2), target[1]], dim=1).numpy()
    coords = {"latitude": val.layout.grid.latitudes()}
    fc = xr.DataArray(forecast, dims=("number", "time", "channel", "latitude", "longitude"), coords=coords)
    tr = xr.DataArray(truth, dims=("time", "channel", "latitude", "longitude"), coords=coords)
    dims = ("time", "channel", "latitude", "longitude")
    assert rows[0]["crps"] == pytest.approx(float(crps(fc, tr, dims=dims)), rel=1e-5)
    assert rows[0]["spread_skill"] == pytest.approx(float(spread_skill_ratio(fc, tr, dims=dims)), rel=1e-5)


@pytest.mark.filterwarnings("ignore::bdlens.perturbation.patterns.UnresolvedScaleWarning")
def test_sppt_ensemble_pattern_is_keyed_by_init_not_by_batch(world: dict) -> None:  # noqa: F811
    bayes, val = world["bayes"], world["val"]
    layout = val.layout
    sppt = SPPT(layout.grid, layout.levels, layout.upper_variables, layout.surface_variables)
    samples = [val[i][0] for i in range(3)]

    def forecast(indices: list[int], keys: list[int] | None, seed: int = 1) -> list:
        """Two SPPT steps for the forecasts ``samples[indices]`` with these init keys (None: no start())."""
        previous, current = (tuple(x) for x in default_collate([samples[i] for i in indices]))
        ensemble = SPPTEnsemble(bayes, sppt, layout, val.stats, 3, seed)
        if keys is not None:
            ensemble.start(keys)
        with torch.no_grad():
            one = ensemble.step(previous, current)
            return [one, ensemble.step(current, one)]

    together, alone, with_third = forecast([0, 1], [100, 106]), forecast([1], [106]), forecast([1, 2], [106, 112])
    for a, b, c in zip(together, alone, with_third, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            torch.testing.assert_close(x[:, 1], y[:, 0], rtol=0, atol=0)
            torch.testing.assert_close(z[:, 0], y[:, 0], rtol=0, atol=0)
    unperturbed = PerturbedEnsemble(bayes, None, 3, seed=1)
    with torch.no_grad():
        plain = unperturbed.step(*(tuple(x) for x in default_collate([samples[1]])))
    assert not torch.allclose(alone[0][0], plain[0])  # SPPT perturbs the step
    assert not torch.allclose(forecast([1], [107])[1][0], alone[1][0])  # another init key, another pattern
    torch.testing.assert_close(forecast([1], None)[1][0], forecast([1], [0])[1][0], rtol=0, atol=0)  # default: positions


def test_calibrate_cli_learned_and_sppt(world: dict, tmp_path: Path, capsys) -> None:  # noqa: F811
    (tmp_path / "perturb.yaml").write_text(json.dumps(perturb_config(steps=2).model_dump(mode="json")))
    run = tmp_path / "run"
    assert main(["-q", "train", "perturb", "--from", str(world["vi"]), "--config", str(tmp_path / "perturb.yaml"), "--out", str(run)]) == 0
    cal = {"members": 3, "leads": [1, 2], "max_forecasts": 2, "batch_size": 2, "amplitude": {"max_evaluations": 4}}
    (tmp_path / "cal.yaml").write_text(json.dumps(cal))
    common = ["-q", "calibrate", "--vi", str(world["vi"]), "--config", str(tmp_path / "cal.yaml")]
    capsys.readouterr()
    assert main([*common, "--perturb", str(run / "checkpoint"), "--out", str(tmp_path / "learned"), "--beside-checkpoint"]) == 0
    record = json.loads((tmp_path / "learned" / "calibration.json").read_text())
    assert json.loads((run / "checkpoint" / "calibration.json").read_text()) == record
    assert record["method"] == "learned" and record["after"]["objective"] <= record["before"]["objective"]
    assert record["before"]["amplitude"] == 1.0 and [r["lead_steps"] for r in record["after"]["per_lead"]] == [1, 2]
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["crps"] == [record["before"]["crps"], record["after"]["crps"]]
    # an existing calibration is not replaced without being asked, neither in --out nor beside the checkpoint
    assert main([*common, "--perturb", str(run / "checkpoint"), "--out", str(tmp_path / "other"), "--beside-checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "checkpoint" / "calibration.json") in err and "--overwrite" in err
    assert not (tmp_path / "other").exists()

    assert main([*common, "--sppt", "perturbation_sppt", "--out", str(tmp_path / "sppt")]) == 0
    record = json.loads((tmp_path / "sppt" / "calibration.json").read_text())
    assert record["method"] == "sppt" and record["after"]["objective"] <= record["before"]["objective"]
    calibrated = load_sppt_config(tmp_path / "sppt" / "perturbation_sppt_calibrated.yaml")
    assert [s.sigma for s in calibrated.scales] == pytest.approx([0.52 * record["amplitude"], 0.18 * record["amplitude"], 0.06 * record["amplitude"]])

    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "none"), "--overwrite"]) == 2
    assert "nothing to calibrate" in capsys.readouterr().err


def test_scores_do_not_depend_on_the_batch_size(world: dict) -> None:  # noqa: F811
    """Each forecast's perturbation noise is keyed by its sample, so batching changes nothing but rounding."""
    from test_perturbation_learned import network

    ensemble = PerturbedEnsemble(world["bayes"], network(world, init_sigma=0.5), 3, seed=4)
    one, two = (ensemble_scores(ensemble, world["val"], [1, 2], max_forecasts=3, batch_size=b) for b in (1, 2))
    for a, b in zip(one, two, strict=True):
        for key in ("crps", "rmse", "spread"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert one[0]["spread"] > 0


def test_the_shipped_posterior_temperature_scales_each_weight_deviation() -> None:
    """θ_k − μ = T·σ⊙ε_k, with ε_k member k's standard-normal draw, for the bundled learned-perturbation
    ensemble at its calibrated temperature (calibration.json: T = 2) — not T² or √T, and not a scaled θ."""
    from bdlens import streams
    from bdlens.bayes.sampling import WEIGHT_STREAM
    from bdlens.checkpoint import bundled_checkpoint
    from bdlens.ensemble import Design, Forecast, Forecaster
    from bdlens.perturbation.learned import read_calibration

    temperature = read_calibration(bundled_checkpoint("perturb_6h"))["temperature"]
    assert temperature == 2
    source, used = Forecaster.from_pretrained(device="cpu").source(Design(2, 1), "none", True, seed=17, temperature=temperature)
    assert used["temperature"] == 2
    source.start(Forecast(0, (0, 1)))  # the engine's posterior members: weight samples 0 and 1 of every step model
    post = source.models[6].bayes.posterior
    with torch.no_grad():
        for k, theta in enumerate(source.weights[6]):
            eps = torch.randn(post.size, generator=streams.generator(17, WEIGHT_STREAM, k), dtype=post.mu.dtype).double()
            assert abs(float(eps.mean())) < 0.01 and float(eps.std()) == pytest.approx(1.0, abs=0.01)
            expected = temperature * post.sigma.double() * eps
            # float32 weights: μ + T·σε is rounded to the float32 spacing of μ
            rounding = 2 * torch.finfo(torch.float32).eps * post.mu.double().abs()
            assert bool(((theta - post.mu).double() - expected).abs().le(rounding + 1e-5 * expected.abs()).all())
            assert float(expected.abs().median()) > 100 * float(rounding.median())  # the deviations are resolved
