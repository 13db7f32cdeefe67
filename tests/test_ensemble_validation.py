"""The trainers' ensemble validation scores agree with bdlens.metrics and do not depend on the batch
size; the shipped posterior temperature scales each weight deviation."""

from __future__ import annotations

import pytest
import torch
import xarray as xr
from test_perturbation_learned import perturb_config, world  # noqa: F401  (tiny VI posterior and its data)
from test_training import tiny_setup  # noqa: F401
from torch.utils.data import default_collate

from bdlens.metrics import crps, spread_skill_ratio
from bdlens.training.ensemble_validation import ensemble_scores
from bdlens.training.perturbation import PerturbedEnsemble


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
    """θ_k − μ = T·σ⊙ε_k, with ε_k member k's standard-normal draw — not T² or √T, and not a scaled θ —
    and the engine's default is the bundled system's calibrated temperature (ensemble.json)."""
    from bdlens import streams
    from bdlens.bayes.sampling import WEIGHT_STREAM
    from bdlens.ensemble import Design, Forecast, Forecaster
    forecaster = Forecaster.from_pretrained(device="cpu")
    shipped = forecaster.system.scheme(forecaster.default_perturbation()).get("temperature", 1.0)
    _, used = forecaster.source(Design(2, 1), forecaster.default_perturbation(), True, seed=17)
    assert used["temperature"] == shipped
    temperature = 2.0  # the scaling is checked at T ≠ 1, where T, T² and √T differ
    source, used = forecaster.source(Design(2, 1), "none", True, seed=17, temperature=temperature)
    assert used["temperature"] == temperature
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
