"""bdlens.data.FieldLayout: the xarray ⇄ torch conversion (shapes, order, exact round trip, normalisation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from synthetic import SURFACE, UPPER, synthetic_dataset

from bdlens.data import FieldLayout, Fields, NormStats, compute_stats
from bdlens.errors import BdlensError

LEVELS = (250, 500, 850)


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return synthetic_dataset(times=3, levels=LEVELS, upper_variables=UPPER, surface_variables=SURFACE, constant_variables=("land_sea_mask",))


@pytest.fixture(scope="module")
def layout(ds) -> FieldLayout:
    return FieldLayout.from_dataset(ds[list(UPPER + SURFACE)], constants=ds[["land_sea_mask"]])


def test_layout_from_dataset_uses_canonical_order(ds, layout):
    shuffled = ds[["temperature", "2m_temperature", "geopotential", *UPPER[2:], *SURFACE]]
    assert FieldLayout.from_dataset(shuffled).variables == layout.variables
    assert layout.upper_variables == UPPER and layout.levels == LEVELS
    assert layout.surface_variables == ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind", "mean_sea_level_pressure")
    assert layout.upper_shape == (4, 3, 32, 64) and layout.surface_shape == (4, 32, 64)


def test_layout_serialises_and_compares_by_value(layout):
    again = FieldLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout and hash(again) == hash(layout)
    assert FieldLayout(["temperature"], [500], [], grid=layout.grid) == FieldLayout(("temperature",), (500,), (), grid=layout.grid)


def test_to_tensors_puts_each_field_in_its_slot(ds, layout):
    fields = layout.to_tensors(ds)
    assert fields.upper.shape == (3, 4, 3, 32, 64) and fields.surface.shape == (3, 4, 32, 64)
    assert fields.upper.dtype == torch.float32
    for b in range(3):
        for v, name in enumerate(layout.upper_variables):
            for z, level in enumerate(LEVELS):
                np.testing.assert_array_equal(fields.upper[b, v, z].numpy(), ds[name].isel(time=b).sel(level=level).values)
        for v, name in enumerate(layout.surface_variables):
            np.testing.assert_array_equal(fields.surface[b, v].numpy(), ds[name].isel(time=b).values)


def test_round_trip_is_exact(ds, layout):
    fields = layout.to_tensors(ds)
    back = layout.from_tensors(fields, coords={"time": ds["time"].values})
    xr.testing.assert_equal(back, ds[list(layout.variables)])
    assert back["temperature"].attrs["units"] == "K" and back["level"].attrs["units"] == "hPa"


def test_round_trip_of_a_single_time_and_of_ensemble_batch_dims(ds, layout):
    single = ds.isel(time=1)
    back = layout.from_tensors(layout.to_tensors(single))
    xr.testing.assert_equal(back, single[list(layout.variables)].drop_vars("time"))
    ens = xr.concat([ds, ds + 1.0], dim=xr.DataArray([0, 1], dims="number", name="number"))
    ens = ens.transpose("number", "time", ...)
    fields = layout.to_tensors(ens)
    assert fields.upper.shape[0] == 6
    back = layout.from_tensors(fields, coords={"number": [0, 1], "time": ds["time"].values})
    xr.testing.assert_equal(back, ens[list(layout.variables)].astype(np.float32))


def test_normalisation_matches_the_formula_and_inverts(ds, layout):
    stats = compute_stats(ds[list(layout.variables)])
    fields = layout.to_tensors(ds, stats=stats)
    mean, std = stats.field("temperature", [500])
    expected = (ds["temperature"].sel(level=500).values.astype(np.float64) - mean[0]) / std[0]
    np.testing.assert_allclose(fields.upper[:, 1, 1].numpy(), expected, rtol=1e-5, atol=1e-5)
    back = layout.from_tensors(fields, coords={"time": ds["time"].values}, stats=stats)
    xr.testing.assert_allclose(back, ds[list(layout.variables)], rtol=1e-6, atol=1e-4)  # float32 rounding of normalised values
    # denormalise ∘ normalise on tensors with extra leading dims (B, T, ...)
    raw = layout.to_tensors(ds)
    stacked = Fields(raw.upper[None].double(), raw.surface[None].double())
    again = layout.denormalise(layout.normalise(stacked, stats), stats)
    torch.testing.assert_close(again.upper, stacked.upper)
    torch.testing.assert_close(again.surface, stacked.surface)


def test_constants_tensor(ds, layout):
    const = ds[["land_sea_mask"]]
    raw = layout.constants_tensor(const)
    assert raw.shape == (1, 32, 64)
    np.testing.assert_array_equal(raw[0].numpy(), const["land_sea_mask"].values)
    normed = layout.constants_tensor(const, compute_stats(const))
    w = np.cos(np.deg2rad(ds["latitude"].values))[:, None] * np.ones((1, 64))  # ≈ cell areas on 64x32
    assert abs(np.average(normed[0].numpy(), weights=w)) < 0.01


def test_layout_mismatches_are_clear_errors(ds, layout):
    with pytest.raises(BdlensError, match="lacks variable\\(s\\) temperature"):
        layout.to_tensors(ds.drop_vars("temperature"))
    with pytest.raises(BdlensError, match="lacks level\\(s\\) \\[850\\]"):
        layout.to_tensors(ds.sel(level=[250, 500]))
    with pytest.raises(BdlensError, match="does not match the layout's 64x32 grid"):
        layout.to_tensors(ds.isel(latitude=slice(None, None, -1)))
    fields = layout.to_tensors(ds)
    with pytest.raises(BdlensError, match="do not multiply to the batch size 3"):
        layout.from_tensors(fields, coords={"time": ds["time"].values[:2]})
    with pytest.raises(BdlensError, match="no entry for specific_humidity"):
        NormStats(mean={}, std={}, levels=(), key="").field("specific_humidity")
