"""The data layer on the real demo world (`bdlens world build --small`, shared session fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from bdlens.data import TimeRange, check_finite, load_data_config, make_datasets, open_dataset
from bdlens.grid import GRIDS


@pytest.mark.parametrize("store", ["truth.zarr", "analysis.zarr"])
def test_demo_world_opens_unchanged(small_world, store):
    cfg = load_data_config("configs/data_demo.yaml")
    ds = open_dataset(small_world / store, variables=cfg.upper_variables + cfg.surface_variables, levels=cfg.levels)
    raw = xr.open_zarr(small_world / store)
    assert ds.sizes["latitude"] == 32 and ds.sizes["longitude"] == 64 and ds["level"].values.tolist() == cfg.levels
    np.testing.assert_allclose(raw["latitude"].values, GRIDS["64x32"].latitudes(), atol=1e-9)  # already canonical
    for name in cfg.upper_variables + cfg.surface_variables:
        np.testing.assert_array_equal(ds[name].values, raw[name].transpose(*ds[name].dims).values)
    check_finite(ds, source=store)


def test_demo_world_serves_samples(small_world, tmp_path):
    cfg = load_data_config("configs/data_demo.yaml")
    times = open_dataset(small_world / "truth.zarr")["time"].values
    middle = times[times.size // 2]

    def iso(t: np.datetime64) -> str:
        return str(np.datetime_as_string(t, unit="m"))

    splits = {"train": TimeRange(start=iso(times[0]), end=iso(middle)), "val": TimeRange(start=iso(middle + np.timedelta64(6, "h")), end=iso(times[-1]))}
    cfg = cfg.model_copy(update={"splits": splits})
    sets = make_datasets(cfg, data_path=small_world / "truth.zarr", stats_path=tmp_path / "stats.json", in_memory=True)
    (x0, x1), y = sets["train"][0]
    assert x0.upper.shape == (4, 8, 32, 64) and y.surface.shape == (4, 32, 64)
    assert sets["train"].sample_times(0)[-1] <= middle < sets["val"].sample_times(0)[0]
    # normalised with training statistics: order-one values
    assert 0.3 < float(x1.upper.std()) < 3.0 and abs(float(x1.upper.mean())) < 1.0
