"""``bdlens.uncertainty_maps`` and its plot panel on synthetic K × J ensembles and on a store in the forecast layout."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
from matplotlib.figure import Figure
from synthetic import synthetic_dataset, synthetic_forecast

import bdlens
from bdlens.data import open_dataset
from bdlens.errors import BdlensError
from bdlens.report.maps import plot_uncertainty


def brute_force_anova(members: np.ndarray, k: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Â, Ê unclipped, s² of all members) along axis 0 of members ordered (k, j), by plain numpy."""
    grouped = members.reshape(k, j, *members.shape[1:])
    aleatoric = grouped.var(axis=1, ddof=1).mean(axis=0)
    epistemic = grouped.mean(axis=1).var(axis=0, ddof=1) - aleatoric / j
    return aleatoric, epistemic, members.var(axis=0, ddof=1)


@pytest.mark.parametrize(("k", "j"), [(2, 2), (4, 3)])
def test_identity_and_finite_sample_correction_on_synthetic_kxj(k, j):
    truth = synthetic_dataset(times=6, upper_variables=(), surface_variables=("2m_temperature",))
    forecast = synthetic_forecast(truth, n_inits=2, lead_hours=(6, 12), weight_samples=k, draws=j, epistemic_std=0.3)
    maps = bdlens.uncertainty_maps(forecast, thresholds=[285.0, 300.0])
    total2 = maps["2m_temperature_total_std"].values ** 2
    epistemic2, aleatoric2 = maps["2m_temperature_epistemic_std"].values ** 2, maps["2m_temperature_aleatoric_std"].values ** 2
    np.testing.assert_allclose(epistemic2 + aleatoric2, total2, rtol=1e-10, atol=0)

    members = forecast["2m_temperature"].values.astype(np.float64)  # member i = (k = i // J, j = i % J)
    a_ref, e_ref, s2 = brute_force_anova(members, k, j)
    np.testing.assert_allclose(aleatoric2, a_ref, rtol=1e-5)
    positive = e_ref > 0
    assert positive.any() and (~positive).any()  # both cases occur on these small samples
    np.testing.assert_allclose(epistemic2[positive], e_ref[positive], rtol=1e-4, atol=1e-6 * a_ref.max())
    assert np.all(epistemic2[~positive] == 0.0)
    # Where Ê ≥ 0 the total is the unbiased Ê + Â, tied to the plain member variance s² by
    # (N − 1) s² = K(J − 1) Â + J(K − 1)(Ê + Â/J).
    n = k * j
    implied_total = ((n - 1) * s2 - k * (j - 1) * a_ref) / (j * (k - 1)) - a_ref / j + a_ref
    np.testing.assert_allclose(total2[positive], implied_total[positive], rtol=1e-4)
    fraction = maps["2m_temperature_epistemic_fraction"].values
    assert np.nanmin(fraction) >= 0 and np.nanmax(fraction) <= 1
    np.testing.assert_allclose(maps["2m_temperature_mean"].values, members.mean(axis=0), rtol=1e-6)
    exceed = maps["2m_temperature_exceedance_probability"].sel({"2m_temperature_threshold": 300.0}).values
    np.testing.assert_allclose(exceed, (members > 300.0).mean(axis=0))
    assert maps["2m_temperature_total_std"].attrs["units"] == "K"


def test_maps_on_a_forecast_store_in_the_engine_layout_are_lazy(tmp_path):
    """Members stored shuffled with their coordinates: the maps must follow the coordinates, not the order."""
    k, j = 3, 2
    truth = synthetic_dataset(times=6, levels=(500, 850), upper_variables=("geopotential",), surface_variables=())
    forecast = synthetic_forecast(truth, n_inits=2, lead_hours=(6, 12, 24), weight_samples=k, draws=j, epistemic_std=2.0)
    order = np.random.default_rng(0).permutation(k * j)
    forecast.isel(number=order).assign_coords(number=np.arange(k * j)).chunk({"time": 1}).to_zarr(tmp_path / "fc.zarr", consolidated=False)
    stored = open_dataset(tmp_path / "fc.zarr")
    maps = bdlens.uncertainty_maps(stored, levels=[500], leads=[12, 24])
    assert isinstance(maps["geopotential_total_std"].data, dask.array.Array)
    assert maps["geopotential_total_std"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    computed = maps.compute()
    np.testing.assert_allclose(
        computed["geopotential_epistemic_std"] ** 2 + computed["geopotential_aleatoric_std"] ** 2, computed["geopotential_total_std"] ** 2, rtol=1e-10
    )
    members = forecast["geopotential"].sel(level=[500]).isel(prediction_timedelta=[1, 2]).values.astype(np.float64)
    a_ref, e_ref, _ = brute_force_anova(members, k, j)
    np.testing.assert_allclose(computed["geopotential_aleatoric_std"].values ** 2, a_ref, rtol=1e-5)
    np.testing.assert_allclose(computed["geopotential_epistemic_std"].values ** 2, np.clip(e_ref, 0, None), rtol=1e-4, atol=1e-6 * a_ref.max())
    # With epistemic std twice the aleatoric one, most of the variance is epistemic.
    assert float(computed["geopotential_epistemic_fraction"].mean()) > 0.6


def test_without_design_the_split_is_refused_and_total_only_is_the_member_std():
    truth = synthetic_dataset(times=6, upper_variables=(), surface_variables=("2m_temperature",))
    forecast = synthetic_forecast(truth, n_inits=2, lead_hours=(6,), weight_samples=5, draws=1, design=False)
    with pytest.raises(BdlensError, match="lack the 'weight_sample'.*split=False"):
        bdlens.uncertainty_maps(forecast)
    maps = bdlens.uncertainty_maps(forecast, split=False)
    assert "2m_temperature_epistemic_std" not in maps
    np.testing.assert_allclose(maps["2m_temperature_total_std"].values, forecast["2m_temperature"].values.std(axis=0, ddof=1), rtol=1e-6)
    with pytest.raises(BdlensError, match=r"no lead\(s\) \[48.0\] h"):
        bdlens.uncertainty_maps(forecast, leads=[48], split=False)
    with pytest.raises(BdlensError, match="no variable"):
        bdlens.uncertainty_maps(forecast, variables=["geopotential"], split=False)
    with pytest.raises(BdlensError, match="at least 2 members"):
        bdlens.uncertainty_maps(forecast.isel(number=0), split=False)


def test_panel_has_four_maps_shared_spread_scale_and_unit_labels(tmp_path):
    truth = synthetic_dataset(times=6, levels=(500, 850), upper_variables=("temperature",), surface_variables=())
    maps = bdlens.uncertainty_maps(synthetic_forecast(truth, n_inits=2, lead_hours=(6, 12)))
    fig = plot_uncertainty(maps, "temperature", level=850, lead=6)
    assert isinstance(fig, Figure)
    maps_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in maps_axes] == ["ensemble mean", "total σ", "epistemic σ", "aleatoric σ"]
    spreads = [ax.collections[0].get_clim() for ax in maps_axes[1:]]
    assert spreads[0] == spreads[1] == spreads[2] and spreads[0][0] == 0.0
    expected_max = max(float(maps[f"temperature_{q}"].sel(level=850).isel(prediction_timedelta=0, time=0).max()) for q in ("total_std", "epistemic_std", "aleatoric_std"))
    assert spreads[0][1] == pytest.approx(expected_max)
    labels = {ax.get_xlabel() for ax in fig.axes} | {ax.get_ylabel() for ax in fig.axes}
    assert "temperature (K)" in labels and "standard deviation (K)" in labels and "latitude (°N)" in labels
    assert "850 hPa" in fig.get_suptitle() and "+6 h" in fig.get_suptitle()
    fig.savefig(tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 10_000
