"""Reference outputs of the bundled deterministic models and perturbation network, to prove that their outputs never change.

The bundled checkpoints were trained with the legacy token convention (levels in ascending hPa with
the surface token beside the top level, shifted windows rolled by −half a window). Code changes to
the backbone must keep them loading and giving the same outputs. ``python tests/bundled_reference.py``
writes ``tests/data/bundled_reference.npz`` (run once, at commit df0932f, before the
convention became a configuration field); ``tests/test_bundled_models.py`` compares against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bdlens.checkpoint import bundled_checkpoint
from bdlens.models.pretrained import load_trained
from bdlens.perturbation.learned import load_perturbation

REFERENCE = Path(__file__).resolve().parent / "data" / "bundled_reference.npz"
NAMES = ("det_6h", "det_24h", "perturb_6h")


def reference_inputs(config) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed normalised inputs (2, T_in, V_u, Z, H, W), (2, T_in, V_s, H, W): seeded unit Gaussians."""
    g = torch.Generator().manual_seed(2024)
    upper = torch.randn(2, config.n_input_times, config.n_upper, config.n_levels, config.nlat, config.nlon, generator=g)
    surface = torch.randn(2, config.n_input_times, config.n_surface, config.nlat, config.nlon, generator=g)
    return upper, surface


@torch.no_grad()
def bundled_outputs(name: str) -> dict[str, np.ndarray]:
    """The bundled network's normalised output on :func:`reference_inputs` (the perturbation network's
    μ + σ), subsampled (every 4th latitude and 8th longitude: 8 × 8 points per field), plus the float64
    sum of every output field."""
    if name.startswith("perturb"):
        network = load_perturbation(bundled_checkpoint(name))[0]
        mu, sigma = network(*reference_inputs(network.config))
        upper, surface = mu.upper + sigma.upper, mu.surface + sigma.surface
    else:
        model = load_trained(bundled_checkpoint(name)).model
        upper, surface = model(*reference_inputs(model.config))
    return {
        f"{name}/upper": upper[..., ::4, ::8].double().numpy(),
        f"{name}/surface": surface[..., ::4, ::8].double().numpy(),
        f"{name}/upper_sum": upper.double().sum(dim=(-2, -1)).numpy(),
        f"{name}/surface_sum": surface.double().sum(dim=(-2, -1)).numpy(),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **{k: v for name in NAMES for k, v in bundled_outputs(name).items()})
    print(f"wrote {REFERENCE}")
