"""Deterministic forecasts: checkpoint round trip and hierarchical composition against a manual one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import synthetic_dataset

from bdlens.checkpoint import save_checkpoint
from bdlens.data import FieldLayout, compute_stats
from bdlens.errors import BdlensError
from bdlens.forecast import deterministic_forecast
from bdlens.grid import GRIDS
from bdlens.models.config import ModelConfig
from bdlens.models.pretrained import TrainedModel, load_trained
from bdlens.models.transformer import EarthSpecificTransformer

UPPER = ("geopotential", "temperature")
SURFACE = ("2m_temperature", "mean_sea_level_pressure")


def _model(step: int, seed: int, stats, layout: FieldLayout) -> TrainedModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        upper_variables=UPPER, levels=(500, 850), surface_variables=SURFACE, grid="64x32", step_hours=step,
        embed_dim=8, depths=(1, 1, 1, 1), heads=(1, 2, 2, 1), window=(2, 4, 8), patch=(2, 4, 4), residual=True,
    )
    model = EarthSpecificTransformer(config).eval()
    return TrainedModel(model, layout, stats, {"kind": "deterministic"}, Path("memory"))


@pytest.fixture(scope="module")
def setup():
    ds = synthetic_dataset(times=24, upper_variables=UPPER, surface_variables=SURFACE)
    layout = FieldLayout(UPPER, (500, 850), SURFACE, GRIDS["64x32"])
    stats = compute_stats(ds)
    return ds, layout, {6: _model(6, 0, stats, layout), 24: _model(24, 1, stats, layout)}


def test_checkpoint_round_trip_gives_identical_forecasts(setup, tmp_path: Path) -> None:
    ds, layout, models = setup
    m = models[6]
    manifest = {"kind": "deterministic", "model_config": m.model.config.model_dump(mode="json"), "norm_stats": m.stats.to_dict()}
    loaded = load_trained(save_checkpoint(tmp_path / "c", m.model.state_dict(), manifest))
    x = layout.to_tensors(ds.isel(time=[4, 5]))
    prev, cur = layout.to_tensors(ds.isel(time=[3, 4])), x
    torch.testing.assert_close(loaded.step(prev, cur).upper, m.step(prev, cur).upper, rtol=0, atol=0)
    manifest["kind"] = "vi"
    save_checkpoint(tmp_path / "v", m.model.state_dict(), manifest)
    with pytest.raises(BdlensError, match="deterministic one is needed"):
        load_trained(tmp_path / "v")


def test_hierarchical_forecast_matches_manual_composition(setup) -> None:
    ds, layout, models = setup
    init = ds.time.values[8]  # 2000-01-03T00: has the −6 h and −24 h analyses
    fc = deterministic_forecast(models, ds, [init], [6, 12, 24, 30])
    at = lambda hours: layout.to_tensors(ds.sel(time=[init + np.timedelta64(hours, "h")]))  # noqa: E731
    m6, m24 = models[6].step, models[24].step
    s6 = m6(at(-6), at(0))
    s12 = m6(at(0), s6)
    s18 = m6(s6, s12)
    s24 = m24(at(-24), at(0))
    s30 = m6(s18, s24)  # the 6 h model continues from the 24 h anchor; its t−Δ state is the 18 h anchor
    for lead, state in ((6, s6), (12, s12), (24, s24), (30, s30)):
        got = layout.to_tensors(fc.sel(prediction_timedelta=np.timedelta64(lead, "h")))
        torch.testing.assert_close(got.upper, state.upper, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(got.surface, state.surface, rtol=1e-6, atol=1e-3)
    assert fc.geopotential.dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")


def test_forecast_needs_the_analysis_history(setup) -> None:
    ds, _, models = setup
    with pytest.raises(BdlensError, match="lacks .* time"):
        deterministic_forecast(models, ds, [ds.time.values[0]], [6])


def test_posterior_forecast_members_are_reproducible_and_near_the_mean_model(setup, tmp_path: Path) -> None:
    from bdlens.bayes import PosteriorSettings, from_deterministic, save_posterior
    from bdlens.forecast import posterior_forecast

    ds, layout, models = setup
    paths = {}
    for step, m in models.items():
        bayes = from_deterministic(m.model, PosteriorSettings(init_sigma_scale=1e-3))
        paths[step] = save_posterior(bayes, tmp_path / f"vi_{step}", norm_stats=m.stats.to_dict())
    init = ds.time.values[8:10]
    three = posterior_forecast(paths, layout, ds, init, [6, 24, 30], members=3, seed=5)
    two = posterior_forecast(paths, layout, ds, init, [6, 24, 30], members=2, seed=5, batch_size=1)
    assert three.geopotential.dims == ("number", "time", "prediction_timedelta", "level", "latitude", "longitude")
    # Member k does not depend on how many members or inits were computed together.
    np.testing.assert_allclose(two.geopotential.values, three.geopotential.isel(number=slice(0, 2)).values, rtol=1e-5, atol=1e-2)
    spread = float(three.geopotential.std("number").mean())
    assert spread > 0.0
    det = deterministic_forecast(models, ds, init, [6, 24, 30])
    mean_error = float(abs(three.geopotential.mean("number") - det.geopotential).mean())
    assert mean_error < 0.2 * float(abs(det.geopotential - ds.geopotential.sel(time=init).mean()).mean())


def test_init_keys_are_whole_hours_since_1970() -> None:
    from bdlens.forecast import init_keys

    times = np.array(["1970-01-02T00", "1969-12-31T23", "2020-01-01T06"], dtype="datetime64[ns]")
    assert init_keys(times) == [24, -1, (np.datetime64("2020-01-01T06") - np.datetime64("1970-01-01T00")) // np.timedelta64(1, "h")]
    with pytest.raises(BdlensError, match="whole hours"):
        init_keys(np.array(["2020-01-01T06:30"], dtype="datetime64[ns]"))


def test_learned_perturbation_forecast_does_not_depend_on_the_batch(setup, tmp_path: Path) -> None:
    from bdlens.bayes import PosteriorSettings, from_deterministic, save_posterior
    from bdlens.forecast import _run
    from bdlens.perturbation.learned import LearnedPerturbationStep, PerturbationNetwork, save_perturbation
    from bdlens.training.perturbation import PerturbConfig

    ds, layout, models = setup
    model, stats = models[6].model, models[6].stats.to_dict()
    vi = save_posterior(from_deterministic(model, PosteriorSettings(init_sigma_scale=1e-3)), tmp_path / "vi", norm_stats=stats)
    config = PerturbConfig.model_validate({"network": {"embed_dim": 8, "heads": [1, 1, 1, 1], "init_sigma": 0.5}, "training": {"steps": 1}})
    torch.manual_seed(0)
    network = PerturbationNetwork(config.network.model_config_for(model.config), config.network.init_sigma, config.network.init_scale)
    perturbation = save_perturbation(network, config.network, tmp_path / "p", stats)

    def forecast(inits: np.ndarray, batch_size: int, seed: int = 3):
        stepper = LearnedPerturbationStep(vi, perturbation, members=2, seed=seed, layout=layout)
        return _run({6: stepper}, layout, model.config.n_input_times == 2, ds, inits, [6, 12], batch_size, 2)

    t1, t2, t3 = ds.time.values[8:11]
    together = forecast([t1, t2], batch_size=2)
    one_by_one = forecast([t1, t2], batch_size=1)
    with_t3 = forecast([t2, t3], batch_size=2)
    alone = forecast([t2], batch_size=1)
    for name in ("geopotential", "2m_temperature"):
        np.testing.assert_array_equal(one_by_one[name].values, together[name].values)
        for other in (with_t3, alone):
            np.testing.assert_array_equal(other[name].sel(time=t2).values, together[name].sel(time=t2).values)
    assert float(abs(together.geopotential.diff("number")).mean()) > 0  # the members differ
    reseeded = forecast([t2], batch_size=1, seed=4)
    assert not np.allclose(reseeded.geopotential.values, alone.geopotential.values)
