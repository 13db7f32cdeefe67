"""Conditional EDM diffusion on the 3DEST backbone (docs/science.md §8; Karras et al. 2022, GenCast-style; docs/diffusion.md).

**Target.** The residual X_{t+Δ} − X_t in *residual units*: minus the mean and over the std of the
tendency over the training period per variable and level (:class:`ResidualScaling`), so σ_data = 1.
It is generated conditioned on (X_{t−Δ}, X_t) (normalised states).

**Denoiser** (:class:`Denoiser`). D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), X_{t−Δ}, X_t)
with the preconditioning of :func:`preconditioning`:

    c_skip = σ_d²/(σ² + σ_d²),  c_out = σ σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),  c_noise = ¼ ln σ.

F is a 3DEST (:func:`denoiser_config`) whose inputs are the two conditioning states and the scaled
noisy residual, stacked like input times, and whose every block's layer norms are adaptive layer
norms driven by the noise level: c_noise → Fourier features (:class:`FourierEmbedding`) → a small
MLP → the conditioning vector. Training minimises λ(σ)·‖D(y + σn; σ) − y‖², λ = (σ² + σ_d²)/(σσ_d)²
(:func:`loss_weight`), with ln σ ~ N(P_mean, P_std²).

**Sampler** (:func:`heun_sample`). Karras et al.'s Algorithm 2: Heun's 2nd-order method on the
probability-flow ODE over N noise levels σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,
i = 0 … N−1, and σ_N = 0 (:func:`sigma_schedule`); the last step is a plain Euler step, so a sample
costs 2N − 1 network evaluations (39 at N = 20). Optional stochastic churn: at σ_i in
[churn_min, churn_max] the state is first noised up to σ̂ = (1 + γ)σ_i, γ = min(churn/N, √2 − 1).

**Randomness** (:class:`DiffusionSampler`): every draw of member m of the forecast with init key i
producing lead L comes from one generator of (seed, "diffusion", i, m, L) (:func:`bdlens.streams.generator`),
so a member does not depend on its batch. The member source of the ensemble engine is
:class:`bdlens.ensemble.diffusion.DiffusionMembers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from bdlens import streams
from bdlens.checkpoint import load_state_into, load_weights, read_manifest
from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.errors import BdlensError
from bdlens.models.config import ModelConfig
from bdlens.models.transformer import EarthSpecificTransformer

KIND = "diffusion"
NOISE_STREAM = "diffusion"


class EDMSettings(BaseModel):
    """The diffusion model's fixed settings: σ_data, the training distribution of σ and the noise embedding width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_data: float = Field(default=1.0, gt=0, description="std of the target (residual units: 1)")
    log_sigma_mean: float = Field(default=-1.2, description="P_mean: ln σ ~ N(P_mean, P_std²) in training")
    log_sigma_std: float = Field(default=1.2, gt=0, description="P_std")
    embedding_dim: int = Field(default=32, ge=2, description="width of the noise embedding fed to the adaptive layer norms")


class SamplerSettings(BaseModel):
    """Heun sampler: N noise levels from σ_max down to σ_min with exponent ρ, then 0; optional churn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=20, ge=2, description="N; 2N − 1 network evaluations per sample")
    sigma_min: float = Field(default=0.03, gt=0)
    sigma_max: float = Field(default=80.0, gt=0)
    rho: float = Field(default=7.0, gt=0)
    churn: float = Field(default=0.0, ge=0, description="S_churn (0: the deterministic ODE sampler)")
    churn_min: float = Field(default=0.0, ge=0, description="S_tmin: churn only at σ_i ≥ this")
    # None, not ∞: the settings go into JSON manifests, where ∞ has no representation.
    churn_max: float | None = Field(default=None, gt=0, description="S_tmax: churn only at σ_i ≤ this (None: no upper bound)")
    churn_noise: float = Field(default=1.0, gt=0, description="S_noise: std of the churn noise")

    @model_validator(mode="after")
    def _ordered(self) -> SamplerSettings:
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self

    @property
    def network_evaluations(self) -> int:
        """Network evaluations per sample: 2N − 1."""
        return 2 * self.steps - 1


def preconditioning(sigma: Tensor, sigma_data: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM at noise levels ``sigma`` (any shape, same shape out)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def loss_weight(sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ σ_d)², which gives every noise level unit loss at initialisation."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sigma_schedule(settings: SamplerSettings) -> Tensor:
    """σ_0 > … > σ_{N−1} (σ_max to σ_min, ρ-spaced) followed by σ_N = 0: shape (N + 1,), float64."""
    i = torch.arange(settings.steps, dtype=torch.float64)
    lo, hi = settings.sigma_min ** (1 / settings.rho), settings.sigma_max ** (1 / settings.rho)
    sigmas = (hi + i / (settings.steps - 1) * (lo - hi)) ** settings.rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class FourierEmbedding(nn.Module):
    """c_noise (B,) → [cos 2πf_k c, sin 2πf_k c] (B, 2F) with F frequencies f_k geometric from 1 to 64
    (fixed: c_noise = ¼ ln σ spans about 2 units, so these resolve it from coarse to fine)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(0, math.log10(64), features), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        angle = 2 * math.pi * c_noise[:, None].float() * self.frequencies
        return torch.cat([angle.cos(), angle.sin()], dim=-1)


def denoiser_config(config: ModelConfig, edm: EDMSettings) -> ModelConfig:
    """The denoiser network's config for a forecast model ``config``: one more input (the noisy
    residual), no built-in residual connection (the preconditioning has the skip), adaptive layer norms."""
    update = {"n_input_times": config.n_input_times + 1, "residual": False, "conditioning_dim": edm.embedding_dim}
    return ModelConfig.from_dict(config.model_dump() | update, source="diffusion denoiser")


class Denoiser(nn.Module):
    """D(x; σ, X_{t−Δ}, X_t): the preconditioned 3DEST denoiser (see the module docstring).

    ``config`` is the forecast model's (variables, grid, step, input times); normalised states,
    residual units for x and the output.
    """

    def __init__(self, config: ModelConfig, edm: EDMSettings) -> None:
        super().__init__()
        self.config, self.edm = config, edm
        self.net = EarthSpecificTransformer(denoiser_config(config, edm))
        width = edm.embedding_dim
        self.embedding = FourierEmbedding(width // 2)
        self.noise_mlp = nn.Sequential(nn.Linear(2 * (width // 2), width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, noisy: Fields, sigma: Tensor, condition: Sequence[Fields], constants: Tensor | None = None) -> Fields:
        """noisy: Fields (B, …) in residual units at noise levels ``sigma`` (B,); ``condition``: the
        input states, oldest first, Fields (B, …) each → the denoised residual, Fields (B, …)."""
        c_skip, c_out, c_in, c_noise = (c.to(noisy.upper.dtype) for c in preconditioning(sigma, self.edm.sigma_data))
        grid = lambda c, x: c.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731  (B,) → broadcastable against x
        upper = torch.stack([*(f.upper for f in condition), grid(c_in, noisy.upper) * noisy.upper], 1)
        surface = torch.stack([*(f.surface for f in condition), grid(c_in, noisy.surface) * noisy.surface], 1)
        out_upper, out_surface = self.net(upper, surface, constants, self.noise_mlp(self.embedding(c_noise)))
        return Fields(
            grid(c_skip, noisy.upper) * noisy.upper + grid(c_out, out_upper) * out_upper,
            grid(c_skip, noisy.surface) * noisy.surface + grid(c_out, out_surface) * out_surface,
        )


class ResidualScaling(nn.Module):
    """Normalised states ⇄ residual units: r = ((X_{t+Δ} − X_t)·s_state − m_res)/s_res per variable and level,
    with the states' std s_state and the tendency's mean m_res and std s_res (physical units)."""

    def __init__(self, layout: FieldLayout, state_stats: NormStats, residual_stats: NormStats) -> None:
        super().__init__()
        state, residual = layout.norm_tensors(state_stats, torch.float64), layout.norm_tensors(residual_stats, torch.float64)
        for part in ("upper", "surface"):
            scale = getattr(state, f"{part}_std") / getattr(residual, f"{part}_std")
            offset = getattr(residual, f"{part}_mean") / getattr(residual, f"{part}_std")
            self.register_buffer(f"{part}_scale", scale.float(), persistent=False)
            self.register_buffer(f"{part}_offset", offset.float(), persistent=False)

    def to_residual(self, current: Fields, target: Fields) -> Fields:
        """The residual of normalised ``target`` from normalised ``current`` in residual units."""
        return Fields(*((t - c) * s - o for c, t, s, o in self._parts(current, target)))

    def from_residual(self, current: Fields, residual: Fields) -> Fields:
        """The normalised next state from ``current`` and a residual in residual units."""
        return Fields(*(c + (r + o) / s for c, r, s, o in self._parts(current, residual)))

    def _parts(self, a: Fields, b: Fields) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        return [(a.upper, b.upper, self.upper_scale, self.upper_offset), (a.surface, b.surface, self.surface_scale, self.surface_offset)]


def heun_sample(
    denoise: Callable[[Tensor, float], Tensor], noise: Callable[[], Tensor], settings: SamplerSettings
) -> tuple[Tensor, int]:
    """One EDM sample per row (Karras et al. 2022, Algorithm 2); returns it and the network evaluations.

    ``denoise(x, σ)`` → D(x; σ) for x of any shape; ``noise()`` → the next standard normal draw of
    that shape (first the initial state's, then one per churned step, in order).
    """
    sigmas = sigma_schedule(settings).tolist()
    n = settings.steps
    x = sigmas[0] * noise()
    evaluations = 0
    for i in range(n):
        sigma, following = sigmas[i], sigmas[i + 1]
        gamma = min(settings.churn / n, math.sqrt(2) - 1) if settings.churn and settings.churn_min <= sigma <= (settings.churn_max or math.inf) else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * settings.churn_noise * noise()
        slope = (x - denoise(x, sigma_hat)) / sigma_hat
        evaluations += 1
        x_next = x + (following - sigma_hat) * slope
        if following:  # Heun's correction, except into σ = 0
            corrected = (x_next - denoise(x_next, following)) / following
            evaluations += 1
            x_next = x + (following - sigma_hat) * (slope + corrected) / 2
        x = x_next
    return x, evaluations


class DiffusionSampler:
    """Samples X_{t+Δ} for rows (member, init key) from normalised (X_{t−Δ}, X_t); see :meth:`sample`."""

    def __init__(
        self, denoiser: Denoiser, scaling: ResidualScaling, settings: SamplerSettings, seed: int, constants: Tensor | None = None
    ) -> None:
        self.denoiser, self.scaling, self.settings, self.seed, self.constants = denoiser, scaling, settings, int(seed), constants

    @torch.no_grad()
    def sample(self, previous: Fields | None, current: Fields, rows: Sequence[tuple[int, int]], lead: int) -> tuple[Fields, int]:
        """Normalised next states (N, …) and the network evaluations per row; row n is member
        ``rows[n][0]`` of the forecast with init key ``rows[n][1]``, its noise from the generator of
        (seed, "diffusion", member, ``lead``, init) alone."""
        condition = [current] if self.denoiser.config.n_input_times == 1 else [previous, current]
        if any(c is None for c in condition):
            raise BdlensError("this diffusion model takes two input times: pass the state at t−Δ as `previous`")
        if len(rows) != current.upper.shape[0]:
            raise BdlensError(f"{len(rows)} (member, init) keys were given for {current.upper.shape[0]} states; give one per row")
        shapes = (current.upper.shape[1:], current.surface.shape[1:])
        sizes = [math.prod(s) for s in shapes]
        generators = [streams.generator(self.seed, NOISE_STREAM, member, lead, init) for member, init in rows]
        dtype = current.upper.dtype

        def noise() -> Tensor:
            return torch.stack([torch.randn(sum(sizes), generator=g, dtype=dtype) for g in generators]).to(current.upper.device)

        def unflat(x: Tensor) -> Fields:
            upper, surface = torch.split(x, sizes, dim=1)
            return Fields(upper.reshape(-1, *shapes[0]), surface.reshape(-1, *shapes[1]))

        def denoise(x: Tensor, sigma: float) -> Tensor:
            levels = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
            out = self.denoiser(unflat(x), levels, condition, self.constants)
            return torch.cat([out.upper.flatten(1), out.surface.flatten(1)], dim=1)

        residual, evaluations = heun_sample(denoise, noise, self.settings)
        return self.scaling.from_residual(current, unflat(residual)), evaluations


class DiffusionEnsemble:
    """K diffusion members as an ensemble stepper in normalised units (the validation of training):
    ``step(previous, current)`` takes shared (B, …) or per-member (K, B, …) states and returns
    (K, B, …); :meth:`start` keys the noise to the forecasts (else their batch positions)."""

    def __init__(self, sampler: DiffusionSampler, members: int) -> None:
        self.sampler, self.size = sampler, int(members)
        self.init_keys: tuple[int, ...] | None = None
        self.lead = 0

    def start(self, init_keys: Sequence[int]) -> None:
        self.init_keys, self.lead = tuple(int(k) for k in init_keys), 0

    def step(self, previous: tuple[Tensor, Tensor] | None, current: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if current[0].ndim == 5:  # from the shared analysis: a new rollout
            self.lead = 0
        self.lead += 1
        cur, prev = self._per_member(current), self._per_member(previous)
        k, b = cur.upper.shape[:2]
        keys = self.init_keys if self.init_keys is not None and len(self.init_keys) == b else tuple(range(b))
        flat = lambda s: None if s is None else Fields(*(x.reshape(k * b, *x.shape[2:]) for x in s))  # noqa: E731
        out, _ = self.sampler.sample(flat(prev), flat(cur), [(m, keys[i]) for m in range(k) for i in range(b)], self.lead)
        return tuple(x.reshape(k, b, *x.shape[1:]) for x in out)

    def _per_member(self, state: tuple[Tensor, Tensor] | None) -> Fields | None:
        if state is None:
            return None
        shared = state[0].ndim == 5  # upper (B, V, Z, H, W), not (K, B, …)
        return Fields(*(x.expand(self.size, *x.shape) if shared else x for x in state))


def load_diffusion(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict[str, Any]]:
    """The denoiser of a ``bdlens train diffusion`` checkpoint (eval mode, on ``device``) and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise BdlensError(f"{directory} holds a {manifest.get('kind')!r} checkpoint, not a diffusion model; train one with `bdlens train diffusion`")
    for key in ("model_config", "edm", "norm_stats", "residual_stats"):
        if key not in manifest:
            raise BdlensError(f"{directory}/manifest.json lacks {key}; retrain it with `bdlens train diffusion`")
    config = ModelConfig.from_dict(manifest["model_config"], source=f"{directory}/manifest.json")
    denoiser = Denoiser(config, EDMSettings.model_validate(manifest["edm"]))
    load_state_into(denoiser, load_weights(directory), directory)
    return denoiser.to(device).eval(), manifest
