"""Initial-condition perturbations for baseline ensembles (docs/science.md §5): white Gaussian noise, spherical
Gaussian random fields and bred vectors.

All return *perturbations* δ (add them, or ± pairs, to the analysis) on physical fields: upper air
(B, V_u, Z, H, W) and surface (B, V_s, H, W), latitude ascending, one row per member. Every member
draws from its own generator derived from (seed, stream, member) (see
:func:`bdlens.streams.generator`), so member m's perturbation does not depend
on the batch it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from bdlens import streams
from bdlens.errors import BdlensError
from bdlens.grid import Grid
from bdlens.perturbation.patterns import PatternScale, SphericalPattern, members_tuple

#: A model state: one tensor or a tuple of tensors (e.g. (upper, surface)), batch dimension first.
State = torch.Tensor | tuple[torch.Tensor, ...]


def _as_std(std: Sequence | np.ndarray | torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(std, dtype=np.float64))
    if tensor.ndim != ndim or bool((tensor < 0).any()):
        raise BdlensError(f"{name} must be a non-negative array with {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    return tensor


def gaussian_perturbation(
    upper_std: Sequence | np.ndarray | torch.Tensor,
    surface_std: Sequence | np.ndarray | torch.Tensor,
    grid: Grid,
    *,
    seed: int,
    members: int | Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """White Gaussian noise, independent at every grid point, with std ``upper_std`` (V_u, Z) and
    ``surface_std`` (V_s,) in the fields' units. Returns (δ_upper (B, V_u, Z, H, W), δ_surface (B, V_s, H, W))."""
    upper = _as_std(upper_std, 2, "upper_std")
    surface = _as_std(surface_std, 1, "surface_std")
    shapes = [(*upper.shape, grid.nlat, grid.nlon), (surface.shape[0], grid.nlat, grid.nlon)]
    noise_upper, noise_surface = member_noise(shapes, seed, members, "gaussian-ic")
    return (
        (noise_upper * upper[None, :, :, None, None]).to(device, dtype),
        (noise_surface * surface[None, :, None, None]).to(device, dtype),
    )


def random_field_perturbation(
    upper_std: Sequence | np.ndarray | torch.Tensor,
    surface_std: Sequence | np.ndarray | torch.Tensor,
    grid: Grid | str,
    length_km: float,
    *,
    seed: int,
    members: int | Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical Gaussian random fields with correlation length ``length_km``, independent for every
    variable and level, with grid-point std ``upper_std`` (V_u, Z) and ``surface_std`` (V_s,).

    Uses :class:`~bdlens.perturbation.patterns.SphericalPattern` (one scale, unit std, not clipped).
    Returns (δ_upper (B, V_u, Z, H, W), δ_surface (B, V_s, H, W)).
    """
    upper = _as_std(upper_std, 2, "upper_std").to(device, dtype)
    surface = _as_std(surface_std, 1, "surface_std").to(device, dtype)
    pattern = SphericalPattern(grid, [PatternScale(1.0, math.inf, length_km)], clip=None, device=device, dtype=dtype)
    n_upper = upper.numel()
    fields = pattern.field(pattern.init(seed, members, channels=n_upper + surface.numel(), stream="random-field-ic"))
    batch, _, nlat, nlon = fields.shape
    delta_upper = fields[:, :n_upper].reshape(batch, *upper.shape, nlat, nlon) * upper[None, :, :, None, None]
    delta_surface = fields[:, n_upper:] * surface[None, :, None, None]
    return delta_upper, delta_surface


def member_noise(
    shapes: Sequence[tuple[int, ...]],
    seed: int,
    members: int | Sequence[int],
    stream: str,
    *,
    step: int = 0,
    inits: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Standard normal float64 noise, one tensor per shape: (K, *shape), member k from the generator of
    (seed, stream, k, step); with ``inits`` (one integer key per forecast) (K, N, *shape), member k of
    forecast i from the generator of (seed, stream, k, step, inits[i])."""
    sizes = [math.prod(shape) for shape in shapes]
    keys = (None,) if inits is None else tuple(int(i) for i in inits)
    flat = torch.stack(
        [
            torch.randn(sum(sizes), generator=streams.generator(seed, stream, m, step, i), dtype=torch.float64)
            for m in members_tuple(members)
            for i in keys
        ]
    )
    lead = (-1,) if inits is None else (-1, len(keys))
    return [chunk.reshape(*lead, *shape) for chunk, shape in zip(torch.split(flat, sizes, dim=1), shapes, strict=True)]


def _as_tuple(state: State) -> tuple[torch.Tensor, ...]:
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def _like(parts: Sequence[torch.Tensor], template: State) -> State:
    return parts[0] if isinstance(template, torch.Tensor) else tuple(parts)


def rms_norm(delta: State) -> torch.Tensor:
    """Root mean square over every non-batch element of every tensor of ``delta``: shape (B,).

    Only meaningful when all tensors are in comparable units (e.g. normalised fields); pass your
    own norm to :func:`bred_vectors` otherwise.
    """
    parts = _as_tuple(delta)
    total = sum(p.double().pow(2).flatten(1).sum(dim=1) for p in parts)
    count = sum(p[0].numel() for p in parts)
    return torch.sqrt(total / count)


class BredVectors(NamedTuple):
    """Result of :func:`bred_vectors`: the bred perturbation pair (batch = members) valid at the
    control's final pair of times, and that control pair (batch 1)."""

    prev: State
    cur: State
    control_prev: State
    control_cur: State


def bred_vectors(
    step: Callable[[State, State], State],
    prev: State,
    cur: State,
    *,
    amplitude: float,
    cycles: int,
    seed: int,
    members: int | Sequence[int],
    norm: Callable[[State], torch.Tensor] = rms_norm,
    init: int | None = None,
) -> BredVectors:
    """Bred vectors by the rescale-and-cycle loop (Toth & Kalnay 1993), for any two-time-level model.

    ``step(prev, cur) -> next`` advances batched states (batch first); ``prev``/``cur`` are the
    control's two input times with batch 1, or one row per member (for a step whose model differs
    between members, e.g. posterior weight samples). ``init``: the forecast's key, so that every
    forecast breeds from its own noise (member k's η comes from (seed, "breeding", k, 0, init)). Start: the pair (δ_prev, δ_cur) = (η, η), η white
    Gaussian noise of each member's own stream, rescaled to ``norm`` = ``amplitude``. Each of
    ``cycles`` cycles: the control and the perturbed members (control + δ) take one step; the new
    perturbation is δ_next = perturbed next − control next; the pair (δ_cur, δ_next) is multiplied
    by amplitude / norm(δ_next). Both times of the pair get the same factor because the pair is the
    model's state: under linear dynamics scaling the pair scales everything that follows, so the
    loop is a power iteration and the perturbation turns towards the fastest-growing mode of the
    flow. The control runs freely (a perfect-model breeding cycle): start ``cycles`` steps before
    the time to perturb. Returns :class:`BredVectors`; use control ± δ for paired members.
    """
    if cycles < 1 or not amplitude > 0:
        raise BdlensError(f"bred vectors need cycles >= 1 and amplitude > 0, got {cycles} and {amplitude}")
    prev_parts, cur_parts = _as_tuple(prev), _as_tuple(cur)
    ids = members_tuple(members)
    if any(p.shape[0] not in (1, len(ids)) for p in prev_parts + cur_parts):
        raise BdlensError(f"bred_vectors takes the control state with batch size 1 or one row per member ({len(ids)})")
    shapes = [p.shape[1:] for p in cur_parts]
    keys = None if init is None else (init,)
    noise = [n.reshape(len(ids), *shape) for n, shape in zip(member_noise(shapes, seed, ids, "breeding", inits=keys), shapes, strict=True)]
    eta = _like([n.to(p.device, p.dtype) for n, p in zip(noise, cur_parts, strict=True)], cur)

    def scaled(delta: State, factor: torch.Tensor) -> State:
        return _like([d * factor.to(d.dtype).view(-1, *([1] * (d.ndim - 1))) for d in _as_tuple(delta)], delta)

    def add(a: State, b: State) -> State:
        return _like([x + y for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True)], a)

    def sub(a: State, b: State) -> State:
        return _like([x - y for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True)], a)

    delta_prev = delta_cur = scaled(eta, amplitude / norm(eta))
    control_prev, control_cur = prev, cur
    with torch.no_grad():
        for _ in range(cycles):
            control_next = step(control_prev, control_cur)
            perturbed_next = step(add(control_prev, delta_prev), add(control_cur, delta_cur))
            delta_next = sub(perturbed_next, control_next)
            factor = amplitude / norm(delta_next)
            delta_prev, delta_cur = scaled(delta_cur, factor), scaled(delta_next, factor)
            control_prev, control_cur = control_cur, control_next
    return BredVectors(delta_prev, delta_cur, control_prev, control_cur)
