"""The Pangu-Weather training loss (docs/science.md §3): latitude- and variable-weighted L1 on normalised fields.

loss = mean_{b,v,z,h,w}(w_v · w_lat(h) · |ŷ − y|)_upper
       + surface_factor · mean_{b,v,h,w}(w_v · w_lat(h) · |ŷ − y|)_surface

with cell-area latitude weights of mean 1 (:func:`bdlens.grid.lat_weights`), Pangu's variable
weights and ``surface_factor`` = 0.25.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bdlens.errors import BdlensError
from bdlens.grid import lat_weights

# Pangu-Weather's per-variable loss weights (Bi et al. 2023). surface_pressure, the demo world's
# stand-in for mean sea level pressure where it writes that instead, gets the MSLP weight.
PANGU_VARIABLE_WEIGHTS: dict[str, float] = {
    "geopotential": 3.00,
    "specific_humidity": 0.60,
    "temperature": 1.50,
    "u_component_of_wind": 0.77,
    "v_component_of_wind": 0.54,
    "mean_sea_level_pressure": 1.50,
    "surface_pressure": 1.50,
    "10m_u_component_of_wind": 0.77,
    "10m_v_component_of_wind": 0.66,
    "2m_temperature": 3.00,
}


def variable_weights(names: Sequence[str]) -> Tensor:
    """Pangu's loss weight of each named variable, shape (len(names),), float32."""
    unknown = [n for n in names if n not in PANGU_VARIABLE_WEIGHTS]
    if unknown:
        raise BdlensError(f"no loss weight for variables {unknown}; known: {sorted(PANGU_VARIABLE_WEIGHTS)}")
    return torch.tensor([PANGU_VARIABLE_WEIGHTS[n] for n in names], dtype=torch.float32)


def weighted_l1(
    pred_upper: Tensor,
    pred_surface: Tensor,
    target_upper: Tensor,
    target_surface: Tensor,
    latitude_weight: Tensor,
    upper_weight: Tensor,
    surface_weight: Tensor,
    surface_factor: float = 0.25,
) -> Tensor:
    """Scalar loss of upper (B, V_u, Z, H, W) and surface (B, V_s, H, W) predictions against targets.

    ``latitude_weight`` (H,) (mean 1), ``upper_weight`` (V_u,), ``surface_weight`` (V_s,).
    """
    lat = latitude_weight.to(pred_upper.dtype)[:, None]
    upper = (pred_upper - target_upper).abs() * lat * upper_weight.to(pred_upper.dtype)[:, None, None, None]
    surface = (pred_surface - target_surface).abs() * lat * surface_weight.to(pred_surface.dtype)[:, None, None]
    return upper.mean() + surface_factor * surface.mean()


class WeightedL1Loss(nn.Module):
    """:func:`weighted_l1` with the weights of one grid and variable set held as buffers.

    ``latitude`` in degrees (H,), ascending as in the canonical layout.
    """

    def __init__(
        self,
        latitude: np.ndarray,
        upper_variables: Sequence[str],
        surface_variables: Sequence[str],
        surface_factor: float = 0.25,
    ) -> None:
        super().__init__()
        self.surface_factor = surface_factor
        self.register_buffer("latitude_weight", torch.as_tensor(lat_weights(latitude), dtype=torch.float32))
        self.register_buffer("upper_weight", variable_weights(upper_variables))
        self.register_buffer("surface_weight", variable_weights(surface_variables))

    def forward(self, pred: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> Tensor:
        """pred, target: (upper (B, V_u, Z, H, W), surface (B, V_s, H, W)) → scalar loss."""
        return weighted_l1(
            pred[0], pred[1], target[0], target[1],
            self.latitude_weight, self.upper_weight, self.surface_weight, self.surface_factor,
        )
