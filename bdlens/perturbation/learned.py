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

The training-time ensemble (:class:`PerturbedEnsemble`, normalised units; forecasts use
:mod:`bdlens.ensemble.schemes.learned`): member k has posterior weight sample θ_k (drawn
from (seed, k), fixed for the rollout, as in :class:`~bdlens.bayes.PosteriorEnsemble`) and its own
noise: ε for member k of the forecast with *init key* i at step s comes from a generator seeded by
(seed, i, k, s) alone (:func:`bdlens.streams.generator`, stream
``learned-perturbation``), so a member's forecast does not depend on which other members or which
other initial times share its batch, nor on the batch size. The init keys of a batch are set by
``start(init_keys)``;
without it they are the positions 0..B−1 in the batch (training and validation). The step counter
restarts at ``start`` and whenever a rollout starts from a state shared by all members (the analysis).

Training: :mod:`bdlens.training.perturbation` (``bdlens train perturb``), fair CRPS over M members
with the backbone frozen and an autoregressive curriculum.

Checkpoint: ``<run>/checkpoint`` with ``model.safetensors`` and a manifest of ``kind:
"perturbation"``, the network's model config and init settings, the norm stats, the backbone (VI)
checkpoint it was trained with, and provenance. A ``calibration.json`` beside it (written by
``bdlens calibrate``) records the calibrated amplitude and posterior temperature.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from bdlens.bayes.posterior import BayesianTransformer, inverse_softplus
from bdlens.bayes.sampling import PosteriorEnsemble
from bdlens.checkpoint import load_state_into, load_weights, read_manifest, require_fields, save_checkpoint
from bdlens.data import Fields
from bdlens.errors import BdlensError
from bdlens.models import EarthSpecificTransformer, ModelConfig
from bdlens.models.layers import PatchRecovery
from bdlens.perturbation.initial import member_noise
from bdlens.perturbation.patterns import init_keys_for, members_tuple

KIND = "perturbation"
FORMAT_VERSION = 1
NOISE_STREAM = "learned-perturbation"
CALIBRATION = "calibration.json"

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
# Ensembles


def tempered_weights(ensemble: PosteriorEnsemble, temperature: float) -> Tensor:
    """Weights μ + T·σ ε of the ensemble's members: its samples μ + σ ε with the deviation scaled by T."""
    if not temperature > 0:
        raise BdlensError(f"the posterior temperature must be positive, got {temperature}")
    mu = ensemble.bayes.posterior.mu.detach()
    return mu + temperature * (ensemble.weights.detach() - mu)


class PerturbedEnsemble:
    """K posterior members, each perturbing its latest input with the learned network before each step.

    Normalised units. :meth:`step` is the ``callable(previous, current)`` of
    :func:`bdlens.models.lead_time.rollout` with the shapes of :class:`~bdlens.bayes.PosteriorEnsemble`:
    shared (B, …) or per-member (K, B, …) states in, (K, B, …) out. ``sigma_scale`` multiplies σ
    (calibrated amplitude), ``temperature`` the posterior's σ at sampling time. ``network=None``
    gives the plain posterior ensemble (no perturbation). :meth:`start` keys the noise to the
    forecasts of the next rollout (see the module docstring).
    """

    def __init__(
        self,
        bayes: BayesianTransformer,
        network: PerturbationNetwork | None,
        members: int | Sequence[int],
        seed: int,
        constants: Tensor | None = None,
        sigma_scale: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        self.members = members_tuple(members)
        with torch.no_grad():
            self.ensemble = PosteriorEnsemble(bayes, self.members, seed, constants, chunk_size)
            if temperature != 1.0:
                self.ensemble.weights = tempered_weights(self.ensemble, temperature)
        self.bayes = bayes
        self.network = network
        self.seed = int(seed)
        self.constants = constants
        self.sigma_scale = float(sigma_scale)
        self.step_index = 0
        self.init_keys: tuple[int, ...] | None = None

    def start(self, init_keys: Sequence[int]) -> None:
        """Key the noise of the next rollout to these forecasts (one integer per forecast of the batch,
        e.g. the init time in hours since 1970) and restart the step counter."""
        self.init_keys = tuple(int(k) for k in init_keys)
        self.step_index = 0

    @property
    def size(self) -> int:
        """K, the number of members."""
        return len(self.members)

    def noise(self, init_keys: Sequence[int], like: State, step: int) -> State:
        """ε for every member and forecast at ``step``: upper (K, B, V_u, Z, H, W), surface (K, B, V_s, H, W)
        with B = len(init_keys), like ``like``'s dtype and device; member k of forecast b from its own
        generator of (seed, init_keys[b], k, step), drawn on the CPU."""
        shapes = [like[0].shape[-4:], like[1].shape[-3:]]
        upper, surface = member_noise(shapes, self.seed, self.members, NOISE_STREAM, step=step, inits=init_keys)
        return upper.to(like[0].device, like[0].dtype), surface.to(like[1].device, like[1].dtype)

    def _per_member(self, state: State) -> State:
        u, s = state
        return (u.expand(self.size, *u.shape), s.expand(self.size, *s.shape)) if u.ndim == 5 else (u, s)

    def step(self, previous: State | None, current: State) -> State:
        """(X_{t−Δ}, X_t) → X_{t+Δ} for every member, X_t perturbed first (see the class docstring)."""
        if current[0].ndim == 5:  # a rollout starts from the shared analysis: restart the noise streams
            self.step_index = 0
        if self.network is not None:
            cur = self._per_member(current)
            k, b = cur[0].shape[:2]
            prev = None if previous is None or self.network.config.n_input_times == 1 else self._per_member(previous)
            flat = lambda state: None if state is None else tuple(x.reshape(k * b, *x.shape[2:]) for x in state)  # noqa: E731
            eps = self.noise(init_keys_for(self.init_keys, b), cur, self.step_index)
            perturbed = self.network.perturb(flat(prev), flat(cur), flat(eps), self.constants, self.sigma_scale)
            current = tuple(x.reshape(k, b, *x.shape[1:]) for x in perturbed)
        self.step_index += 1
        return self.ensemble.step(previous, current)


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


def read_calibration(directory: str | Path) -> dict[str, Any]:
    """The ``calibration.json`` beside a checkpoint's manifest ({} when there is none)."""
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BdlensError(f"{path} is corrupted ({err.msg}); rerun `bdlens calibrate`") from err
