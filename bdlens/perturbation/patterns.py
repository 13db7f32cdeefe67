"""Random patterns on the sphere: Gaussian fields from spherical-harmonic coefficients (docs/science.md §5).

One *scale* is a Gaussian random field with grid-point standard deviation σ, correlation length L
and e-folding time τ. Its real orthonormal spherical-harmonic coefficients r̂_nm have variance
σ_n² with σ_n = c·exp(−κ n(n+1)/2), κ = ½(L/a)², whose spatial correlation is close to the Gaussian
ρ(d) ≈ exp(−d²/(2L²)) for great-circle distance d (the heat kernel on the sphere). By the addition
theorem the grid-point variance is Σ_n σ_n² (2n+1)/(4π), which fixes c so that it equals σ². The
global mean (n = 0) is left out: it would shift every column on Earth by the same amount, which no
local process does, and it makes every pattern average to zero over the sphere.

Time correlation: every coefficient follows AR(1), r̂ ← φ r̂ + sqrt(1−φ²) σ_n η, φ = exp(−Δt/τ),
started from the stationary distribution r̂ = σ_n η, so every step has the same statistics.

Truncation. A grid resolves degrees n ≤ N_grid = min(nlat − 1, nlon/2 − 1) (the longitude Nyquist
wave has no imaginary part on the grid, so it cannot carry the variance of a complex coefficient).
Each scale is further cut where σ_n/σ_1 < 1e-4, which keeps fine grids cheap (the 500 km scale
needs n ≤ 77 even on the 0.25° grid). When a scale has more than 1 % of its variance beyond N_grid,
or L is below the grid spacing (the 500 km SPPT scale on the 5.625° grid, spacing ≈ 625 km), it
is *unresolved*: it is truncated at N_grid, c is computed over the kept degrees so the grid-point
std is still σ (the target variance is kept, on larger scales than asked for), and a
:class:`UnresolvedScaleWarning` says so.

The inverse transform. torch-harmonics' ``"equiangular"`` grid has Clenshaw–Curtis nodes, which
include both poles: its latitudes equal those of the 240×121 and 1440×721 grids exactly (north to
south), but no torch-harmonics grid matches the pole-free 64×32 grid (``"legendre-gauss"`` nodes are
up to 1.4° off). So the normalised associated Legendre functions come from
:func:`torch_harmonics.legendre.legpoly` evaluated at the grid's own latitudes, in our ascending
order (no flip anywhere), and the longitude synthesis is ``torch.fft.irfft`` — the same two
operations as :class:`torch_harmonics.InverseRealSHT`, which the tests check against on 240×121.

Seeding. The noise of member m at step k comes from its own generator of (seed, stream, m, k)
(:func:`bdlens.streams.generator`), so member m's pattern does not
depend on which members share its batch, and the state (coefficients + step counter) is a plain
value: stepping the same state twice gives the same result, and a rollout can be resumed. A state
for several forecasts at once (``inits``: one integer key per forecast, e.g. its init time) draws
every (member, forecast) pair from its own generator of (seed, stream, m, k, init), so a forecast's
pattern does not depend on which other forecasts share its batch either.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch_harmonics.legendre import legpoly

from bdlens import streams
from bdlens.errors import BdlensError
from bdlens.grid import EARTH_RADIUS_M, GRIDS, Grid

# Degrees whose amplitude is below this fraction of the largest (n = 1) are dropped.
_AMPLITUDE_CUTOFF = 1e-4
# A scale that loses more than this fraction of its variance to the grid's truncation is unresolved.
_UNRESOLVED_VARIANCE_FRACTION = 0.01


class UnresolvedScaleWarning(UserWarning):
    """A pattern scale is finer than the grid resolves; it was truncated with its variance kept."""


@dataclass(frozen=True)
class PatternScale:
    """One scale of a random pattern: grid-point std ``sigma`` (dimensionless), e-folding time
    ``tau_hours`` (``math.inf`` for a pattern frozen in time) and correlation length ``length_km``."""

    sigma: float
    tau_hours: float
    length_km: float

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and self.tau_hours > 0 and self.length_km > 0):
            raise BdlensError(
                f"pattern scale {self} is invalid: need sigma >= 0, tau_hours > 0 and length_km > 0"
            )

    @property
    def kappa(self) -> float:
        """κ = ½ (L/a)², the spectral decay rate (dimensionless)."""
        return 0.5 * (self.length_km * 1e3 / EARTH_RADIUS_M) ** 2


# ECMWF's three SPPT scales (docs/science.md §5).
SPPT_SCALES: tuple[PatternScale, ...] = (
    PatternScale(0.52, 6.0, 500.0),
    PatternScale(0.18, 72.0, 1000.0),
    PatternScale(0.06, 720.0, 2000.0),
)


def grid_truncation(grid: Grid) -> int:
    """The largest spherical-harmonic degree N_grid that ``grid`` resolves (see the module doc)."""
    return min(grid.nlat - 1, grid.nlon // 2 - 1)


def _degree_weights(kappa: float, degrees: np.ndarray) -> np.ndarray:
    """(2n+1)·exp(−κ n(n+1)): the share of degree n in the grid-point variance (unnormalised)."""
    return (2 * degrees + 1) * np.exp(-kappa * degrees * (degrees + 1))


def scale_truncation(scale: PatternScale, grid: Grid) -> tuple[int, bool]:
    """(N, unresolved): the degree at which ``scale`` is cut on ``grid``, and whether it is unresolved."""
    kappa = scale.kappa
    # σ_n/σ_1 = exp(−κ (n(n+1) − 2)/2) < cutoff  ⇔  n(n+1) > 2 + 2 ln(1/cutoff)/κ
    n_cut = math.ceil((-1 + math.sqrt(1 + 4 * (2 + 2 * math.log(1 / _AMPLITUDE_CUTOFF) / kappa))) / 2)
    n_grid = grid_truncation(grid)
    degrees = np.arange(1, max(n_cut, n_grid) + 1)
    weights = _degree_weights(kappa, degrees)
    lost = weights[degrees > n_grid].sum() / weights.sum()
    spacing_km = math.radians(grid.dlat) * EARTH_RADIUS_M / 1e3
    unresolved = lost > _UNRESOLVED_VARIANCE_FRACTION or scale.length_km < spacing_km
    return min(n_cut, n_grid), unresolved


def spectral_std(scale: PatternScale, truncation: int) -> np.ndarray:
    """σ_n for n = 0..truncation (σ_0 = 0), normalised so the grid-point std is ``scale.sigma``.

    Shape (truncation + 1,), float64. The coefficient of degree n, order m > 0 is complex with
    E|r̂|² = σ_n²; order 0 is real with variance σ_n² (torch-harmonics' real "ortho" convention).
    """
    degrees = np.arange(truncation + 1)
    weights = _degree_weights(scale.kappa, degrees)
    weights[0] = 0.0
    c2 = 4 * math.pi * scale.sigma**2 / weights.sum()
    return np.sqrt(c2 * np.exp(-scale.kappa * degrees * (degrees + 1))) * (degrees > 0)


def members_tuple(members: int | Sequence[int]) -> tuple[int, ...]:
    """``range(members)`` for an int, else the given member ids, as a tuple (validated)."""
    ids = tuple(range(members)) if isinstance(members, int) else tuple(int(m) for m in members)
    if not ids or min(ids) < 0:
        raise BdlensError(f"members must be a positive count or non-negative ids, got {members!r}")
    return ids


def init_keys_for(keys: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    """The init keys of a batch of ``batch`` forecasts: ``keys`` (checked to be one per forecast), or
    the positions ``range(batch)`` when none were given (training and validation batches)."""
    if keys is None:
        return tuple(range(batch))
    keys = tuple(int(k) for k in keys)
    if len(keys) != batch:
        raise BdlensError(f"{len(keys)} init keys were given for a batch of {batch} forecasts; give one key per forecast")
    return keys


@dataclass(frozen=True)
class PatternState:
    """The AR(1) state of a pattern: one coefficient tensor per scale and the step counter.

    ``coeffs[s]`` has shape (B, C, N_s+1, N_s+1, 2): member, channel, degree n, order m, (real, imag).
    With ``inits`` (one key per forecast) B = K·N, member-major: row k·N + i is member k, forecast i.
    """

    coeffs: tuple[torch.Tensor, ...]
    step: int
    seed: int
    members: tuple[int, ...]
    stream: str
    inits: tuple[int, ...] | None = None


class SphericalPattern:
    """A multi-scale, AR(1)-in-time Gaussian random pattern on one of the supported grids.

    ``init`` draws a stationary state, ``step`` advances it by ``dt_hours`` and ``field`` returns
    the grid-point pattern: the sum of the scales, clipped to [−clip, clip] (``clip=None``: not
    clipped), shape (B, C, nlat, nlon), latitude ascending, ``dtype`` on ``device``.
    """

    def __init__(
        self,
        grid: Grid | str,
        scales: Sequence[PatternScale] = SPPT_SCALES,
        dt_hours: float = 6.0,
        clip: float | None = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(grid, str):
            if grid not in GRIDS:
                raise BdlensError(f"unknown grid {grid!r}; use one of {sorted(GRIDS)}")
            grid = GRIDS[grid]
        if not scales:
            raise BdlensError("a pattern needs at least one scale")
        if not dt_hours > 0:
            raise BdlensError(f"dt_hours must be positive, got {dt_hours}")
        self.grid = grid
        self.scales = tuple(scales)
        self.dt_hours = float(dt_hours)
        self.clip = clip
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

        self.truncations: list[int] = []
        amplitudes, phis = [], []
        for scale in self.scales:
            n_max, unresolved = scale_truncation(scale, grid)
            if unresolved:
                warnings.warn(
                    f"pattern scale L={scale.length_km:g} km is not resolved by the {grid.name} grid "
                    f"(spacing {math.radians(grid.dlat) * EARTH_RADIUS_M / 1e3:.0f} km, degrees <= {n_max}); "
                    f"truncated at degree {n_max} with its grid-point std kept at {scale.sigma:g}",
                    UnresolvedScaleWarning,
                    stacklevel=2,
                )
            self.truncations.append(n_max)
            amplitudes.append(self._noise_amplitude(spectral_std(scale, n_max)))
            phis.append(math.exp(-self.dt_hours / scale.tau_hours))
        self.truncation = max(self.truncations)
        self._amplitudes = amplitudes
        self._phis = phis

        # Normalised Legendre functions at our (ascending) latitudes: (m, n, lat).
        colatitude = torch.as_tensor(np.deg2rad(90.0 - grid.latitudes()), dtype=torch.float64)
        n1 = self.truncation + 1
        self._legendre = legpoly(n1, n1, torch.cos(colatitude), norm="ortho", inverse=True).to(self.device, dtype)

    def _noise_amplitude(self, sigma_n: np.ndarray) -> torch.Tensor:
        """Per-coefficient std of (real, imag) for white noise η: shape (n, m, 2), zero for m > n."""
        n1 = sigma_n.size
        amp = np.zeros((n1, n1, 2))
        lower = np.tril(np.ones((n1, n1), dtype=bool))
        amp[..., 0] = np.where(lower, sigma_n[:, None], 0.0)
        amp[:, 1:, :] /= math.sqrt(2.0)
        amp[..., 1] = amp[..., 0]
        amp[:, 0, 1] = 0.0  # m = 0 coefficients of a real field are real
        return torch.as_tensor(amp, dtype=self.dtype, device=self.device)

    def _noise(
        self, state_seed: int, members: tuple[int, ...], step: int, stream: str, channels: int, inits: tuple[int, ...] | None
    ):
        """White noise η scaled by the per-coefficient std, one tensor per scale, (B, C, n, m, 2)
        (B = K, or K·N member-major with ``inits``)."""
        sizes = [channels * amp.numel() for amp in self._amplitudes]
        keys = (None,) if inits is None else inits
        draws = torch.stack(
            [torch.randn(sum(sizes), generator=streams.generator(state_seed, stream, m, step, i)) for m in members for i in keys]
        ).to(self.device, self.dtype)
        return [
            chunk.reshape(len(members) * len(keys), channels, *amp.shape) * amp
            for chunk, amp in zip(torch.split(draws, sizes, dim=1), self._amplitudes, strict=True)
        ]

    def init(
        self,
        seed: int,
        members: int | Sequence[int],
        channels: int = 1,
        stream: str = "pattern",
        inits: Sequence[int] | None = None,
    ) -> PatternState:
        """A stationary initial state for ``members`` (a count or member ids) with ``channels``
        independent patterns per member; with ``inits`` (one integer key per forecast) one pattern
        per member and forecast, each from its own generator (see :class:`PatternState`)."""
        ids = members_tuple(members)
        if channels < 1:
            raise BdlensError(f"channels must be >= 1, got {channels}")
        keys = None if inits is None else tuple(int(i) for i in inits)
        if keys is not None and not keys:
            raise BdlensError("inits must hold at least one init key")
        coeffs = tuple(self._noise(seed, ids, 0, stream, channels, keys))
        return PatternState(coeffs=coeffs, step=0, seed=int(seed), members=ids, stream=stream, inits=keys)

    def step(self, state: PatternState) -> PatternState:
        """The state ``dt_hours`` later: r̂ ← φ r̂ + sqrt(1−φ²) σ_n η for every coefficient."""
        channels = state.coeffs[0].shape[1]
        noise = self._noise(state.seed, state.members, state.step + 1, state.stream, channels, state.inits)
        coeffs = tuple(
            phi * c + math.sqrt(1.0 - phi * phi) * eta
            for c, eta, phi in zip(state.coeffs, noise, self._phis, strict=True)
        )
        return replace(state, coeffs=coeffs, step=state.step + 1)

    def field(self, state: PatternState) -> torch.Tensor:
        """The grid-point pattern, shape (B, C, nlat, nlon), latitude ascending, clipped if asked."""
        n1 = self.truncation + 1
        total = sum(
            torch.nn.functional.pad(c, (0, 0, 0, n1 - c.shape[-2], 0, n1 - c.shape[-3])) for c in state.coeffs
        )
        # Same synthesis as torch_harmonics.InverseRealSHT: Legendre sum over n, then irfft over m.
        fourier = torch.einsum("bcnmr,mnk->bckmr", total, self._legendre)
        pattern = torch.fft.irfft(torch.view_as_complex(fourier.contiguous()), n=self.grid.nlon, dim=-1, norm="forward")
        if self.clip is not None:
            pattern = pattern.clamp(-self.clip, self.clip)
        return pattern
