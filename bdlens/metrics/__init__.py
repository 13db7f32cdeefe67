"""Ensemble verification metrics (docs/science.md §7): xarray in, xarray out, lazy on dask, member dim ``number``.

Every metric averages over explicit ``dims`` (default time, latitude, longitude, the latitude
average weighted by cell area) and states the reduction in ``attrs["reduced_over"]``; see
:mod:`bdlens.metrics.weighting` for the shared reduction and NaN policy.
"""

from bdlens.metrics.crps import crps, crps_ensemble_numpy
from bdlens.metrics.deterministic import acc, activity_ratio, ensemble_mean, ensemble_mean_mse, ensemble_mean_rmse
from bdlens.metrics.probabilistic import (
    brier_score,
    energy_score,
    energy_score_numpy,
    rank_histogram,
    reliability,
    spread,
    spread_skill_ratio,
)
from bdlens.metrics.spectra import zonal_power_spectrum, zonal_spectra
from bdlens.metrics.weighting import lat_weights, weighted_mean

__all__ = [
    "acc",
    "activity_ratio",
    "brier_score",
    "crps",
    "crps_ensemble_numpy",
    "energy_score",
    "energy_score_numpy",
    "ensemble_mean",
    "ensemble_mean_mse",
    "ensemble_mean_rmse",
    "lat_weights",
    "rank_histogram",
    "reliability",
    "spread",
    "spread_skill_ratio",
    "weighted_mean",
    "zonal_power_spectrum",
    "zonal_spectra",
]
