"""Flow-dependent SPPT applied to the network's tendency, with physical constraints (docs/science.md §5).

With the network increment Δ = f_θ(X) − X_t, the perturbed step is

    X_{t+1} = X_t + (1 + μ(p)·r)·Δ,

with one pattern r (:mod:`bdlens.perturbation.patterns`) per column and member, shared by every
variable and level, so the perturbation is proportional to the tendency: large where the flow
changes fast, zero where it does not. The tensors are physical (de-normalised, SI units): upper air
(B, V_u, Z, H, W) with levels in hPa ascending, surface (B, V_s, H, W), latitude ascending.

The vertical taper μ(p) (:class:`VerticalTaper`) is 1 between ``surface_full_hpa`` (850) and
``top_full_hpa`` (200), falls to 0 at ``surface_zero_hpa`` (1000; the boundary layer, where ECMWF
also tapers SPPT off) and at ``top_zero_hpa`` (100; the stratosphere, where the tendencies are
small and perturbing them only adds noise), with sin² ramps in ln p in between. Surface variables
use μ at ``surface_taper_pressure_hpa`` (1000 hPa, i.e. μ = 0 by default: surface fields follow the
network's tendency unperturbed). It is a fixed pressure rather than the lowest model level, so a
model with a subset of levels (e.g. lowest 925 hPa) still gets the documented surface behaviour.

Constraints, and how each is enforced:

* **Winds**: u and v of a column (upper air and 10 m) are multiplied by the same scalar factor
  1 + μ r, so the perturbed wind tendency is parallel to the network's wind tendency at every point
  and has the same direction; no wind component is perturbed alone. This is the SPPT choice
  (Palmer et al. 2009). It is not a stream-function/velocity-potential perturbation: the spatially
  varying factor can add divergence of size |Δv|·|∇r| to the tendency, as in operational SPPT.
* **Hydrostatic balance** (``hydrostatic: true``): the geopotential is not scaled by the pattern.
  Temperature is perturbed, and the geopotential perturbation is recomputed from it by the
  hypsometric equation, integrating upwards from the lowest (highest-pressure) level:
  δΦ_k = δΦ_{k+1} + R_d · ½(δT_v,k + δT_v,k+1) · ln(p_{k+1}/p_k), where δT_v is the change of
  virtual temperature T(1 + 0.608 q) made by the perturbation (plain T when humidity is absent),
  and δΦ at the lowest level is μ r ΔΦ there (0 with the default taper at 1000 hPa). So the
  thickness of every layer changes by exactly R_d ⟨δT_v⟩ Δln p: the perturbation is hydrostatic,
  whatever the balance of the network's own tendency. Scaling Φ and T by the same factor would only
  be consistent for a factor constant in the vertical, which the taper is not.
* **Humidity ≥ 0**: specific humidity after the step is clipped at 0 (this adds a little moisture
  where a large negative tendency was amplified; operational SPPT does the same).
* **Global-mean surface pressure**: for ``mean_sea_level_pressure`` and ``surface_pressure`` the
  area-weighted global mean of the perturbation (weights :func:`bdlens.grid.lat_weights`) is
  subtracted per member, so the perturbed step has the global-mean pressure of the unperturbed one
  (mass is not created by the perturbation).
* **Activity** (``activity_cap``; :func:`limit_activity`): multiplicative noise on a tendency adds
  variance at every step, and a 24 h step's tendency is the whole day's change, advection
  included. On the demo world the members of a 10-day rollout became 20–25 % more active than the
  world (eddy std of Z500 and T850, docs/science.md §5), and no amplitude could undo that. Given
  the eddy variances of the analysis a member started from, each field's perturbation is shrunk by
  the factor s ∈ [0, 1] (per member, field and step) that keeps the field's eddy variance at most
  ``activity_cap²`` times the analysis's (or at the unperturbed step's, if that is larger). With
  ``hydrostatic`` the geopotential above the lowest level is then recomputed from the limited
  temperature, so it stays hydrostatic; the surface-pressure constraint is applied last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydantic
import torch
import yaml

from bdlens.configs import config_path
from bdlens.errors import BdlensError
from bdlens.grid import Grid, lat_weights
from bdlens.perturbation.patterns import SPPT_SCALES, PatternScale, PatternState, SphericalPattern

R_DRY = 287.05  # J kg⁻¹ K⁻¹, gas constant of dry air
VIRTUAL_FACTOR = 0.608  # R_v/R_d − 1: T_v = T (1 + 0.608 q)
PRESSURE_VARIABLES = ("mean_sea_level_pressure", "surface_pressure")


class VerticalTaper(pydantic.BaseModel):
    """μ(p): 1 in [top_full, surface_full] hPa, 0 outside [top_zero, surface_zero], sin² ramps in ln p."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    top_zero_hpa: float = 100.0
    top_full_hpa: float = 200.0
    surface_full_hpa: float = 850.0
    surface_zero_hpa: float = 1000.0

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> VerticalTaper:
        if not 0 < self.top_zero_hpa < self.top_full_hpa <= self.surface_full_hpa < self.surface_zero_hpa:
            raise ValueError("need 0 < top_zero_hpa < top_full_hpa <= surface_full_hpa < surface_zero_hpa")
        return self

    def __call__(self, pressure_hpa: Sequence[float] | np.ndarray) -> np.ndarray:
        """μ at the given pressures (hPa), float64, same shape."""
        p = np.asarray(pressure_hpa, dtype=np.float64)
        top = np.log(p / self.top_zero_hpa) / math.log(self.top_full_hpa / self.top_zero_hpa)
        bottom = np.log(self.surface_zero_hpa / p) / math.log(self.surface_zero_hpa / self.surface_full_hpa)
        ramp = np.clip(np.minimum(top, bottom), 0.0, 1.0)
        return np.sin(0.5 * np.pi * ramp) ** 2


class ScaleConfig(pydantic.BaseModel):
    """One pattern scale as written in YAML (see :class:`bdlens.perturbation.patterns.PatternScale`)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    sigma: float = pydantic.Field(ge=0)
    tau_hours: float = pydantic.Field(gt=0)
    length_km: float = pydantic.Field(gt=0)


class SPPTConfig(pydantic.BaseModel):
    """SPPT settings: pattern scales, time step, clipping, vertical taper and constraints.

    ``activity_cap``: a perturbed field's eddy variance may reach ``activity_cap²`` × that of the
    analysis the member started from (:func:`limit_activity`); None: no limit.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    scales: list[ScaleConfig] = pydantic.Field(
        default_factory=lambda: [ScaleConfig(sigma=s.sigma, tau_hours=s.tau_hours, length_km=s.length_km) for s in SPPT_SCALES],
        min_length=1,
    )
    dt_hours: float = pydantic.Field(default=6.0, gt=0)
    clip: float | None = pydantic.Field(default=1.0, gt=0)
    taper: VerticalTaper = pydantic.Field(default_factory=VerticalTaper)
    surface_taper_pressure_hpa: float = pydantic.Field(default=1000.0, gt=0)
    hydrostatic: bool = True
    activity_cap: float | None = pydantic.Field(default=1.0, gt=0)

    def pattern_scales(self) -> tuple[PatternScale, ...]:
        """The scales as :class:`PatternScale` objects."""
        return tuple(PatternScale(s.sigma, s.tau_hours, s.length_km) for s in self.scales)


def load_sppt_config(name_or_path: str | Path = "perturbation_sppt") -> SPPTConfig:
    """Read an SPPT config from a YAML file or a name in ``configs/``; bad content → BdlensError."""
    path = config_path(name_or_path)
    try:
        return SPPTConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise BdlensError(f"invalid SPPT config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise BdlensError(f"invalid SPPT config {path}: {problems}") from err


def _index(names: Sequence[str], name: str) -> int | None:
    return list(names).index(name) if name in names else None


def apply_sppt(
    x_upper: torch.Tensor,
    x_surface: torch.Tensor,
    f_upper: torch.Tensor,
    f_surface: torch.Tensor,
    pattern: torch.Tensor,
    *,
    levels_hpa: Sequence[float],
    upper_variables: Sequence[str],
    surface_variables: Sequence[str],
    latitude: np.ndarray,
    config: SPPTConfig | None = None,
    activity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SPPT-perturbed next state X_t + (1 + μ(p) r)(f_θ(X) − X_t) with the module's constraints.

    ``x_*`` is the current state X_t and ``f_*`` the network's next state, physical units:
    upper (B, V_u, Z, H, W) on ``levels_hpa`` (ascending), surface (B, V_s, H, W). ``pattern`` r is
    (B, H, W), ``latitude`` (H,) ascending degrees. ``activity`` (B, V_u·Z + V_s): the eddy variances
    each member's fields may reach (:func:`limit_activity`; None: no limit). Returns (upper, surface)
    shaped like the inputs.
    """
    config = config or SPPTConfig()
    levels = np.asarray(levels_hpa, dtype=np.float64)
    if x_upper.shape != f_upper.shape or x_surface.shape != f_surface.shape:
        raise BdlensError("current and network states must have the same shapes (upper and surface)")
    batch, n_upper, n_levels, height, width = x_upper.shape
    if (n_upper, n_levels) != (len(upper_variables), levels.size) or x_surface.shape[1] != len(surface_variables):
        raise BdlensError(
            f"state shapes {tuple(x_upper.shape)} / {tuple(x_surface.shape)} do not match "
            f"{len(upper_variables)} upper variables × {levels.size} levels and {len(surface_variables)} surface variables"
        )
    if pattern.shape != (batch, height, width):
        raise BdlensError(f"pattern shape {tuple(pattern.shape)} must be (B, H, W) = {(batch, height, width)}")
    if len(latitude) != height:
        raise BdlensError(f"{len(latitude)} latitudes given for states with {height} latitude rows")
    if levels.size > 1 and not np.all(np.diff(levels) > 0):
        raise BdlensError(f"levels must be ascending in hPa, got {levels.tolist()}")
    kw = {"dtype": x_upper.dtype, "device": x_upper.device}

    mu_upper = torch.as_tensor(config.taper(levels), **kw)
    mu_surface = float(config.taper(config.surface_taper_pressure_hpa))
    factor_upper = mu_upper[:, None, None] * pattern.to(x_upper.dtype)[:, None]  # (B, Z, H, W)
    tendency_upper = f_upper - x_upper
    tendency_surface = f_surface - x_surface
    delta_upper = factor_upper[:, None] * tendency_upper
    delta_surface = (mu_surface * pattern)[:, None] * tendency_surface
    if activity is not None:
        delta_upper, delta_surface = limit_activity(f_upper, f_surface, delta_upper, delta_surface, activity, latitude)
    upper, surface = f_upper + delta_upper, f_surface + delta_surface

    i_q = _index(upper_variables, "specific_humidity")
    if i_q is not None:
        upper[:, i_q] = upper[:, i_q].clamp_min(0.0)

    i_z, i_t = _index(upper_variables, "geopotential"), _index(upper_variables, "temperature")
    if config.hydrostatic and i_z is not None and i_t is not None and levels.size > 1:
        upper[:, i_z] = _hydrostatic_geopotential(upper, f_upper, levels, i_z, i_t, i_q)

    weights = _area_weights(latitude, torch.float64, x_surface.device)
    for name in PRESSURE_VARIABLES:
        i_p = _index(surface_variables, name)
        if i_p is not None:
            delta = (surface[:, i_p] - f_surface[:, i_p]).double()
            global_mean = (delta * weights[:, None]).mean(dim=(-2, -1), keepdim=True)
            surface[:, i_p] = f_surface[:, i_p] + (delta - global_mean).to(surface.dtype)
    return upper, surface


def _hydrostatic_geopotential(
    upper: torch.Tensor,
    f_upper: torch.Tensor,
    levels: np.ndarray,
    i_z: int,
    i_t: int,
    i_q: int | None,
) -> torch.Tensor:
    """Perturbed geopotential (B, Z, H, W): the network's Φ plus the hypsometric integral of δT_v."""

    def virtual(state: torch.Tensor) -> torch.Tensor:
        t = state[:, i_t]
        return t if i_q is None else t * (1.0 + VIRTUAL_FACTOR * state[:, i_q])

    delta_tv = virtual(upper) - virtual(f_upper)  # (B, Z, H, W)
    log_ratio = torch.as_tensor(np.log(levels[1:] / levels[:-1]), dtype=upper.dtype, device=upper.device)
    layers = R_DRY * 0.5 * (delta_tv[:, :-1] + delta_tv[:, 1:]) * log_ratio[:, None, None]  # (B, Z−1, H, W)
    bottom = upper[:, i_z, -1] - f_upper[:, i_z, -1]  # the lowest level keeps its SPPT perturbation
    # δΦ_k = δΦ_bottom + Σ_{j ≥ k} layer_j: a cumulative sum from the surface upwards.
    above = torch.flip(torch.cumsum(torch.flip(layers, dims=(1,)), dim=1), dims=(1,))
    delta_z = torch.cat([above, torch.zeros_like(bottom)[:, None]], dim=1) + bottom[:, None]
    return f_upper[:, i_z] + delta_z


class SPPT:
    """SPPT for a fixed grid and field layout: owns the pattern and applies :func:`apply_sppt`.

    ``init(seed, members)`` → pattern state; ``step(state)`` advances it by ``config.dt_hours``;
    ``perturb(state, x_upper, x_surface, f_upper, f_surface)`` → perturbed (upper, surface).
    """

    def __init__(
        self,
        grid: Grid | str,
        levels_hpa: Sequence[float],
        upper_variables: Sequence[str],
        surface_variables: Sequence[str],
        config: SPPTConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config or SPPTConfig()
        self.pattern = SphericalPattern(
            grid, self.config.pattern_scales(), dt_hours=self.config.dt_hours, clip=self.config.clip, device=device
        )
        self.levels_hpa = tuple(levels_hpa)
        self.upper_variables = tuple(upper_variables)
        self.surface_variables = tuple(surface_variables)

    def init(self, seed: int, members: int | Sequence[int], inits: Sequence[int] | None = None) -> PatternState:
        """The stationary pattern state of ``members`` (a count or member ids); with ``inits`` (one
        integer key per forecast) one pattern per member and forecast, member-major (K·N rows)."""
        return self.pattern.init(seed, members, stream="sppt", inits=inits)

    def step(self, state: PatternState) -> PatternState:
        """The pattern state one model step later."""
        return self.pattern.step(state)

    def perturb(
        self,
        state: PatternState,
        x_upper: torch.Tensor,
        x_surface: torch.Tensor,
        f_upper: torch.Tensor,
        f_surface: torch.Tensor,
        activity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The perturbed next state for the members of ``state`` (see :func:`apply_sppt`; ``activity``:
        the eddy variances the fields may reach, e.g. ``activity_cap²`` × :func:`eddy_variance` of the analysis)."""
        return apply_sppt(
            x_upper,
            x_surface,
            f_upper,
            f_surface,
            self.pattern.field(state)[:, 0],
            levels_hpa=self.levels_hpa,
            upper_variables=self.upper_variables,
            surface_variables=self.surface_variables,
            latitude=self.pattern.grid.latitudes(),
            config=self.config,
            activity=activity,
        )


def _eddies(upper: torch.Tensor, surface: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every field's deviation from its zonal mean: upper (B, V_u·Z, H, W) and surface (B, V_s, H, W).

    Contiguous, so that every reduction below runs along rows in the same order whatever the batch
    size (a network's output may be a permuted view, and a reduction over strided memory is
    vectorised across the batch, whose round-off then depends on the batch size).
    """
    return tuple(x - x.mean(dim=-1, keepdim=True) for x in (upper.flatten(1, 2).contiguous(), surface.contiguous()))


def _area_weights(latitude: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cell-area latitude weights (H,) (:func:`bdlens.grid.lat_weights`) as a tensor."""
    return torch.as_tensor(lat_weights(np.asarray(latitude)), dtype=dtype, device=device)


def _eddy_covariance(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Area-weighted mean over (H, W) of x·y for two (upper, surface) eddy pairs, (B, V_u·Z + V_s)."""
    # Elementwise products and reductions along rows only: a matmul or einsum would be faster, but its
    # blocking (and so its round-off) depends on the batch size, and a member must not.
    return torch.cat([((a * b).mean(dim=-1) * weights).mean(dim=-1) for a, b in zip(x, y, strict=True)], dim=1)


def eddy_variance(upper: torch.Tensor, surface: torch.Tensor, latitude: np.ndarray) -> torch.Tensor:
    """Area-weighted variance about the zonal mean of every field, (B, V_u·Z + V_s).

    ``upper`` (B, V_u, Z, H, W), ``surface`` (B, V_s, H, W), ``latitude`` (H,) degrees; units: the
    fields' squared. The eddy variance is the field's "activity": its zonal mean (the meridional
    structure a perturbation should not be judged by) is removed first.
    """
    eddies = _eddies(upper, surface)
    return _eddy_covariance(eddies, eddies, _area_weights(latitude, eddies[0].dtype, eddies[0].device))


def limit_activity(
    f_upper: torch.Tensor,
    f_surface: torch.Tensor,
    d_upper: torch.Tensor,
    d_surface: torch.Tensor,
    cap: torch.Tensor,
    latitude: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The perturbation δ = (``d_upper``, ``d_surface``) of the state f = (``f_upper``, ``f_surface``)
    shrunk to s·δ with, per member and field, the largest s ∈ [0, 1] that keeps the eddy variance
    (:func:`eddy_variance`) of f + s·δ at most max(``cap``, that of f).

    Shapes as in :func:`apply_sppt`; ``cap`` (B, V_u·Z + V_s) eddy variances in the fields' squared
    units. The eddy variance of f + s·δ is the quadratic v + 2 s c + s² a (c the eddy covariance of f
    and δ, a the eddy variance of δ), so s is the positive root of 2 s c + s² a = max(cap − v, 0).
    """
    e_f, e_d = _eddies(f_upper, f_surface), _eddies(d_upper, d_surface)
    weights = _area_weights(latitude, e_f[0].dtype, e_f[0].device)
    v, c, a = (_eddy_covariance(x, y, weights).double() for x, y in ((e_f, e_f), (e_f, e_d), (e_d, e_d)))
    room = (cap.double() - v).clamp_min(0.0)
    root = (-c + torch.sqrt(c.square() + a * room)) / a.clamp_min(torch.finfo(torch.float64).tiny)
    s = torch.where(a > 0, root.clamp(0.0, 1.0), torch.ones_like(a))  # (B, fields)
    n_upper = d_upper.shape[1] * d_upper.shape[2]
    s_upper = s[:, :n_upper].reshape(d_upper.shape[:3]).to(d_upper.dtype)[..., None, None]
    s_surface = s[:, n_upper:].to(d_surface.dtype)[..., None, None]
    return s_upper * d_upper, s_surface * d_surface
