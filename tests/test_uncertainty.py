"""The variance decomposition and the theorem checks of docs/science.md §6 on synthetic ensembles with known truth."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr

from bdlens.errors import BdlensError
from bdlens.metrics import crps
from bdlens.uncertainty import calibration_check, decompose, grouped, mixture_crps_check, total_variance_check

N_POINTS = 20_000


def hierarchical(k: int, j: int, sigma_b: float, sigma_w: float, seed: int = 0, n: int = N_POINTS) -> xr.DataArray:
    """y_kj = b_k + e_kj at n independent points, members in shuffled order with their design coords."""
    rng = np.random.default_rng(seed)
    members = (rng.normal(0, sigma_b, (k, 1, n)) + rng.normal(0, sigma_w, (k, j, n))).reshape(k * j, n)
    order = rng.permutation(k * j)
    return xr.DataArray(
        members[order],
        dims=("number", "time"),
        coords={
            "number": np.arange(k * j),
            "weight_sample": ("number", np.repeat(np.arange(k), j)[order]),
            "perturbation_draw": ("number", np.tile(np.arange(j), k)[order]),
        },
    )


@pytest.mark.parametrize(("k", "j"), [(2, 2), (4, 6)])
def test_decomposition_is_unbiased_within_sampling_error(k, j):
    sigma_b2, sigma_w2 = 0.5, 2.0
    forecast = hierarchical(k, j, np.sqrt(sigma_b2), np.sqrt(sigma_w2))
    result = decompose(forecast, dims=("time",))
    # Sampling variances of the ANOVA estimators at one point (Gaussian chi-square moments).
    var_a = 2 * sigma_w2**2 / (k * (j - 1))
    var_means = 2 * (sigma_b2 + sigma_w2 / j) ** 2 / (k - 1)
    var_e = var_means + var_a / j**2
    assert abs(result.aleatoric.item() - sigma_w2) < 4 * np.sqrt(var_a / N_POINTS)
    assert abs(result.epistemic.item() - sigma_b2) < 4 * np.sqrt(var_e / N_POINTS)
    assert abs(result.total.item() - sigma_b2 - sigma_w2) < 4 * np.sqrt((var_e + var_a) / N_POINTS)
    # The Â/J correction matters: the plain variance of group means would miss by σ_w²/J.
    plain = grouped(forecast).mean("perturbation_draw").var("weight_sample", ddof=1).mean().item()
    assert abs(plain - sigma_b2 - sigma_w2 / j) < 4 * np.sqrt(var_means / N_POINTS)
    assert sigma_w2 / j > 8 * np.sqrt(var_means / N_POINTS)


def test_decomposition_pointwise_matches_direct_anova_and_is_lazy():
    forecast = hierarchical(3, 4, 1.0, 1.0, n=50)
    ordered = forecast.sortby(["weight_sample", "perturbation_draw"]).values.reshape(3, 4, 50)
    within = ordered.var(axis=1, ddof=1).mean(0)
    between = ordered.mean(axis=1).var(axis=0, ddof=1) - within / 4
    eager = decompose(forecast)
    np.testing.assert_allclose(eager.aleatoric.values, within, rtol=1e-12)
    np.testing.assert_allclose(eager.epistemic.values, between, rtol=1e-12)
    assert (eager.epistemic < 0).any()  # unclipped on small samples, as docs/science.md §6.2 asks
    lazy = decompose(forecast.chunk({"time": 7, "number": 5}))
    assert isinstance(lazy.epistemic.data, dask.array.Array)
    np.testing.assert_allclose(lazy.epistemic.values, between, rtol=1e-12)


def test_decomposition_rejects_bad_designs():
    forecast = hierarchical(3, 2, 1.0, 1.0, n=4)
    with pytest.raises(BdlensError, match="lacks the 'weight_sample'"):
        decompose(forecast.drop_vars("weight_sample"))
    with pytest.raises(BdlensError, match="not a balanced grid"):
        decompose(forecast.isel(number=slice(0, 5)))
    with pytest.raises(BdlensError, match="not a balanced grid"):
        decompose(forecast.assign_coords(perturbation_draw=("number", np.zeros(6, int))))


def test_total_variance_check_splits_population_moments():
    forecast = hierarchical(4, 3, 1.5, 0.7, n=30)
    out = total_variance_check(forecast, dims=())
    x = forecast.sortby(["weight_sample", "perturbation_draw"]).values.reshape(4, 3, 30)
    np.testing.assert_allclose(out.total.values, x.reshape(12, 30).var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out.between.values, x.mean(axis=1).var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out.within.values, x.var(axis=1).mean(axis=0), rtol=1e-12)
    assert out.relative_residual.max() < 1e-12


def test_mixture_crps_is_never_worse_and_the_gap_is_half_the_energy_distance():
    k, j, n = 3, 4, 200
    forecast = hierarchical(k, j, 1.0, 0.6, seed=1, n=n)
    truth = xr.DataArray(np.random.default_rng(2).normal(0, 1.3, n), dims=("time",))
    out = mixture_crps_check(forecast, truth, dims=())
    assert (out.gap >= -1e-12).all()
    np.testing.assert_allclose(out.mixture.values, crps(forecast, truth, dims=(), fair=False).values, rtol=1e-12)
    # Independent closed form: gap = ½ [mean_{k,l} D_kl − mean_k D_kk], D_kl = mean |x_ki − x_lj|.
    x = forecast.sortby(["weight_sample", "perturbation_draw"]).values.reshape(k, j, n)
    d = np.abs(x[:, None, :, None, :] - x[None, :, None, :, :]).mean(axis=(2, 3))
    gap = 0.5 * (d.mean(axis=(0, 1)) - np.einsum("kkn->kn", d).mean(axis=0))
    np.testing.assert_allclose(out.gap.values, gap, rtol=1e-10, atol=1e-14)
    assert out.mixture.attrs["crps"] == "standard"


def _calibration_stats(forecast: xr.DataArray, truth: xr.DataArray) -> tuple[float, float]:
    """(ratio from calibration_check, its standard error from the per-point sample)."""
    m = forecast.sizes["number"]
    d = (forecast.mean("number") - truth) ** 2 - (m + 1) / m * forecast.var("number", ddof=1)
    expected = (m + 1) / m * forecast.var("number", ddof=1).mean()
    ratio = calibration_check(forecast, truth).ratio.item()
    return ratio, (d.std() / np.sqrt(d.size) / expected).item()


def test_calibration_identity_holds_for_calibrated_and_fails_for_underdispersive_ensembles():
    rng = np.random.default_rng(5)
    m, n = 8, N_POINTS
    mu, sigma = rng.normal(size=n), rng.uniform(0.5, 2.0, n)
    truth = xr.DataArray(mu + sigma * rng.normal(size=n), dims=("time",))
    calibrated = xr.DataArray(mu + sigma * rng.normal(size=(m, n)), dims=("number", "time"))
    ratio, se = _calibration_stats(calibrated, truth)
    assert abs(ratio - 1) < 4 * se
    narrow = mu + (calibrated - mu) * 0.7
    ratio, se = _calibration_stats(narrow, truth)
    assert ratio - 1 > 8 * se


def test_calibration_identity_uses_m_plus_one_over_m_with_a_sample_that_tells_it_from_m_over_m_minus_one():
    """M = 4: (M+1)/M = 1.25 and M/(M−1) = 1.33 differ by 6.7 %; 200 000 points put that at > 10 standard errors."""
    rng = np.random.default_rng(11)
    m, n = 4, 200_000
    mu, sigma = rng.normal(size=n), rng.uniform(0.5, 2.0, n)
    truth = xr.DataArray(mu + sigma * rng.normal(size=n), dims=("time",))
    calibrated = xr.DataArray(mu + sigma * rng.normal(size=(m, n)), dims=("number", "time"))
    ratio, se = _calibration_stats(calibrated, truth)
    wrong = ratio * (m + 1) / m / (m / (m - 1))  # the ratio an M/(M−1) factor would give on the same sample
    assert abs(ratio - 1) < 4 * se
    assert 1 - wrong > 10 * se
