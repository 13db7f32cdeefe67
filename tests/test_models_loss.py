"""The Pangu-Weather loss against a brute-force loop over every grid value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.models import WeightedL1Loss, variable_weights


def test_weighted_l1_matches_brute_force():
    upper_names = ["geopotential", "temperature", "specific_humidity"]
    surface_names = ["mean_sea_level_pressure", "2m_temperature"]
    latitude = GRIDS["64x32"].latitudes()[::4]  # 8 rows, still equally spaced
    rng = np.random.default_rng(0)
    pu, tu = rng.normal(size=(2, 2, 3, 2, 8, 5))
    ps, ts = rng.normal(size=(2, 2, 2, 8, 5))
    loss = WeightedL1Loss(latitude, upper_names, surface_names)(
        (torch.tensor(pu), torch.tensor(ps)), (torch.tensor(tu), torch.tensor(ts))
    )
    # Cell areas between the latitude edges (half a 22.5° spacing away, clipped at the poles), mean 1.
    edges = np.deg2rad(np.clip(latitude[:, None] + np.array([-11.25, 11.25]), -90, 90))
    area = np.sin(edges[:, 1]) - np.sin(edges[:, 0])
    wlat = area / area.mean()
    wvar = {"geopotential": 3.0, "temperature": 1.5, "specific_humidity": 0.6, "mean_sea_level_pressure": 1.5, "2m_temperature": 3.0}
    upper_terms = [
        wvar[upper_names[v]] * wlat[h] * abs(pu[b, v, z, h, w] - tu[b, v, z, h, w])
        for b in range(2) for v in range(3) for z in range(2) for h in range(8) for w in range(5)
    ]
    surface_terms = [
        wvar[surface_names[v]] * wlat[h] * abs(ps[b, v, h, w] - ts[b, v, h, w])
        for b in range(2) for v in range(2) for h in range(8) for w in range(5)
    ]
    expected = np.mean(upper_terms) + 0.25 * np.mean(surface_terms)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pangu_weights_and_unknown_variable():
    weights = variable_weights(["u_component_of_wind", "v_component_of_wind", "10m_v_component_of_wind"])
    assert weights.tolist() == pytest.approx([0.77, 0.54, 0.66])
    with pytest.raises(BdlensError, match="no loss weight"):
        variable_weights(["vorticity"])
