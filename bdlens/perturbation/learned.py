"""Learned flow-dependent perturbation network, trained with fair CRPS (docs/science.md §5).

A small 3DEST (:class:`PerturbationNetwork`, its own :class:`~bdlens.models.ModelConfig` on the
backbone's variables, levels and grid) maps the latest input state(s) to a mean μ and a standard
deviation σ = softplus(ρ) per grid point, variable and level (normalised units). At every model step
the most recent input state is perturbed,

    X_t' = X_t + μ(X) + s·σ(X) ⊙ ε,    ε ~ N(0, I),

and the frozen backbone steps from (X_{t−Δ}, X_t'). Because μ and σ are recomputed from the current
state, the perturbation follows the flow. ``s`` is the calibrated amplitude (1 when trained).
The network starts harmless: its output convolutions are scaled by ``init_scale`` and the ρ bias
set so that μ ≈ 0 and σ ≈ ``init_sigma`` everywhere.

Forecasts use the network through :mod:`bdlens.ensemble.schemes.learned`; training
(:mod:`bdlens.training.perturbation`, ``bdlens train perturb``) optimises fair CRPS over M members
with the backbone frozen and an autoregressive curriculum. The noise ε of a member comes from the
stream ``learned-perturbation`` of :mod:`bdlens.streams` (:data:`NOISE_STREAM`).

Checkpoint: ``<run>/checkpoint`` with ``model.safetensors`` and a manifest of ``kind:
"perturbation"``, the network's model config and init settings, the norm stats, the backbone (VI)
checkpoint it was trained with, and provenance. The calibrated amplitude lives in the system's
``ensemble.json`` (``bdlens calibrate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from bdlens.bayes.posterior import inverse_softplus
from bdlens.checkpoint import load_state_into, load_weights, read_manifest, require_fields, save_checkpoint
from bdlens.data import Fields
from bdlens.errors import BdlensError
from bdlens.models import EarthSpecificTransformer, ModelConfig
from bdlens.models.layers import PatchRecovery

KIND = "perturbation"
FORMAT_VERSION = 1
NOISE_STREAM = "learned-perturbation"

State = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# The network


class NetworkSettings(BaseModel):
    """Sizes of the perturbation 3DEST (variables, levels and grid come from the backbone) and its start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(default=16, gt=0)
    depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    heads: tuple[int, int, int, int] = (1, 2, 2, 1)
    window: tuple[int, int, int] | None = None
    patch: tuple[int, int, int] | None = None
    n_input_times: int = Field(default=1, ge=1, le=2)
    mlp_ratio: float = Field(default=2.0, gt=0)
    init_sigma: float = Field(default=0.02, gt=0, description="σ everywhere at the start, normalised units")
    init_scale: float = Field(default=0.01, gt=0, description="factor on the output convolutions' initial weights")

    def model_config_for(self, backbone: ModelConfig) -> ModelConfig:
        """The network's :class:`ModelConfig`: the backbone's fields and grid with these sizes
        (window and patch default to the backbone's) and the default token convention (a new network
        is laid out as Pangu does, whatever convention an older backbone was trained with)."""
        if self.n_input_times > backbone.n_input_times:
            raise BdlensError(
                f"the perturbation network cannot take {self.n_input_times} input times: the backbone only gets {backbone.n_input_times}"
            )
        data = backbone.model_dump() | {
            "embed_dim": self.embed_dim, "depths": self.depths, "heads": self.heads, "n_input_times": self.n_input_times,
            "mlp_ratio": self.mlp_ratio, "window": self.window or backbone.window, "patch": self.patch or backbone.patch,
            "drop_path": 0.0, "residual": False, "checkpoint": False, "convention": ModelConfig.model_fields["convention"].default,
        }
        return ModelConfig.from_dict(data, source="perturbation network")


class PerturbationNetwork(nn.Module):
    """A 3DEST whose output holds (μ, ρ) for every variable and level; σ = softplus(ρ).

    Inputs as :class:`~bdlens.models.EarthSpecificTransformer` (normalised, (N, T_in, …)); see
    :meth:`forward` and :meth:`perturb`.
    """

    def __init__(self, config: ModelConfig, init_sigma: float = 0.02, init_scale: float = 0.01) -> None:
        super().__init__()
        self.config = config
        self.net = EarthSpecificTransformer(config)
        c = config
        # Twice the output channels: μ then ρ for every upper-air and surface field.
        self.net.recovery = PatchRecovery(2 * c.embed_dim, 2 * c.n_upper, 2 * c.n_surface, c.patch, (c.n_levels, c.nlat), c.ground_up)
        rho0 = float(inverse_softplus(torch.tensor(init_sigma, dtype=torch.float64)))
        with torch.no_grad():
            for conv, n in ((self.net.recovery.upper, c.n_upper), (self.net.recovery.surface, c.n_surface)):
                conv.weight.mul_(init_scale)
                conv.bias[:n] = 0.0
                conv.bias[n:] = rho0

    def forward(self, upper: Tensor, surface: Tensor, constants: Tensor | None = None) -> tuple[Fields, Fields]:
        """(N, T_in, V_u, Z, H, W), (N, T_in, V_s, H, W) → (μ, σ) as Fields of (N, V_u, Z, H, W), (N, V_s, H, W)."""
        out_upper, out_surface = self.net(upper, surface, constants)
        mu_u, rho_u = out_upper.chunk(2, dim=1)
        mu_s, rho_s = out_surface.chunk(2, dim=1)
        return Fields(mu_u, mu_s), Fields(F.softplus(rho_u), F.softplus(rho_s))

    def perturb(
        self, previous: State | None, current: State, noise: State, constants: Tensor | None = None, scale: float = 1.0
    ) -> Fields:
        """X_t' = X_t + μ + scale·σ ⊙ ε for per-time states (N, …); ``previous`` only for two-time networks."""
        times = [current] if self.config.n_input_times == 1 else [previous, current]
        if any(t is None for t in times):
            raise BdlensError("this perturbation network takes two input times: pass the state at t−Δ as `previous`")
        mu, sigma = self(torch.stack([t[0] for t in times], 1), torch.stack([t[1] for t in times], 1), constants)
        return Fields(*(x + m + scale * s * e for x, m, s, e in zip(current, mu, sigma, noise, strict=True)))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_perturbation(
    network: PerturbationNetwork, settings: NetworkSettings, directory: str | Path, norm_stats: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the network (safetensors) and its manifest (``kind: "perturbation"``, the network's
    model config and settings, ``norm_stats`` and ``extra``) to ``directory``."""
    manifest = {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "model_config": network.config.model_dump(mode="json"),
        "network": settings.model_dump(mode="json"),
        "norm_stats": norm_stats,
        **(extra or {}),
    }
    # Files already there that this does not write (a calibration.json, notes) are kept.
    return save_checkpoint(directory, network.state_dict(), manifest)


def load_perturbation(directory: str | Path, device: torch.device | str = "cpu") -> tuple[PerturbationNetwork, dict[str, Any]]:
    """The network of a ``bdlens train perturb`` checkpoint (eval mode, on ``device``) and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise BdlensError(
            f"{directory} holds a {manifest.get('kind')!r} checkpoint, not a perturbation network; train one with `bdlens train perturb`"
        )
    require_fields(manifest, directory, ("model_config", "norm_stats"))
    config = ModelConfig.from_manifest(manifest["model_config"], source=f"{directory}/manifest.json")
    network = PerturbationNetwork(config)
    load_state_into(network, load_weights(directory), directory)
    return network.to(device).eval(), manifest
