"""Initial-condition perturbations (bdlens.perturbation.initial)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdlens.errors import BdlensError
from bdlens.grid import GRIDS
from bdlens.perturbation.initial import bred_vectors, gaussian_perturbation, random_field_perturbation, rms_norm

GRID = GRIDS["64x32"]
UPPER_STD = [[10.0, 20.0, 30.0], [0.5, 1.0, 2.0]]  # (V_u = 2, Z = 3), e.g. Φ in m²/s², T in K
SURFACE_STD = [100.0, 0.0]  # (V_s = 2); a zero std must give a zero perturbation


def _zonal_lag1(field: torch.Tensor) -> float:
    f = field.double()
    return float((f * torch.roll(f, 1, dims=-1)).mean() / (f**2).mean())


def _check_std(upper: torch.Tensor, surface: torch.Tensor, rel: float) -> None:
    got_upper = upper.double().pow(2).mean(dim=(0, 3, 4)).sqrt().numpy()
    np.testing.assert_allclose(got_upper, UPPER_STD, rtol=rel)
    assert float(surface[:, 0].double().pow(2).mean().sqrt()) == pytest.approx(SURFACE_STD[0], rel=rel)
    assert float(surface[:, 1].abs().max()) == 0.0


def test_gaussian_std_shape_and_whiteness():
    upper, surface = gaussian_perturbation(UPPER_STD, SURFACE_STD, GRID, seed=0, members=8)
    assert upper.shape == (8, 2, 3, 32, 64) and surface.shape == (8, 2, 32, 64)
    assert upper.dtype == torch.float32
    _check_std(upper, surface, rel=0.03)  # 16384 samples per channel: std SE ≈ 0.6 %
    assert abs(_zonal_lag1(upper[:, 0, 0])) < 0.03  # white: no spatial correlation (SE ≈ 0.008)


def test_gaussian_member_independent_of_batch():
    four = gaussian_perturbation(UPPER_STD, SURFACE_STD, GRID, seed=3, members=4)
    picked = gaussian_perturbation(UPPER_STD, SURFACE_STD, GRID, seed=3, members=[2])
    torch.testing.assert_close(picked[0], four[0][2:3], rtol=0, atol=0)
    torch.testing.assert_close(picked[1], four[1][2:3], rtol=0, atol=0)
    assert not torch.equal(four[0][0], four[0][1])


def test_random_field_std_and_spatial_correlation():
    upper, surface = random_field_perturbation(UPPER_STD, SURFACE_STD, GRID, 1000.0, seed=1, members=32)
    assert upper.shape == (32, 2, 3, 32, 64) and surface.shape == (32, 2, 32, 64)
    _check_std(upper, surface, rel=0.08)  # one smooth field per channel: std SE ≈ 2 % with 32 members
    # Neighbours 5.625° apart (≤ 625 km) at L = 1000 km: ρ ≈ exp(−d²/2L²) ≥ 0.8 near the equator.
    assert _zonal_lag1(upper[:, 0, 0]) > 0.7
    # Channels are independent fields.
    a, b = upper[:, 0, 0].double(), upper[:, 0, 1].double()
    assert abs(float((a * b).mean() / (a.pow(2).mean() * b.pow(2).mean()).sqrt())) < 0.1


def test_random_field_member_independent_of_batch():
    many = random_field_perturbation(UPPER_STD, SURFACE_STD, GRID, 1500.0, seed=2, members=5)
    one = random_field_perturbation(UPPER_STD, SURFACE_STD, GRID, 1500.0, seed=2, members=[4])
    torch.testing.assert_close(one[0], many[0][4:5], rtol=1e-6, atol=1e-5)


def _modal_matrices(eigen_a, eigen_b, seed=0):
    """A = Q diag(a) Q⁻¹ and B = Q diag(b) Q⁻¹ with a random, well-conditioned, non-orthogonal Q."""
    rng = np.random.default_rng(seed)
    q = np.eye(len(eigen_a)) + 0.3 * rng.standard_normal((len(eigen_a),) * 2)
    q_inv = np.linalg.inv(q)
    return q, q @ np.diag(eigen_a) @ q_inv, q @ np.diag(eigen_b) @ q_inv


def _cosine(a: torch.Tensor, b: np.ndarray) -> np.ndarray:
    a = a.double().numpy().reshape(a.shape[0], -1)
    return np.abs(a @ b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))


def test_bred_vectors_align_with_the_growing_mode_of_a_linear_map():
    q, a, _ = _modal_matrices([1.5, 0.9, 0.7, 0.5, 0.3, 0.1], [0.0] * 6)
    a_t = torch.as_tensor(a.T)
    step = lambda prev, cur: cur @ a_t  # noqa: E731  (x_{t+1} = A x_t)
    x0 = torch.ones(1, 6, dtype=torch.float64)
    result = bred_vectors(step, x0, x0 @ a_t, amplitude=0.1, cycles=20, seed=0, members=4)
    assert np.all(_cosine(result.cur, q[:, 0]) > 0.9999)  # (0.9/1.5)^20 ≈ 4e-5
    torch.testing.assert_close(rms_norm(result.cur), torch.full((4,), 0.1, dtype=torch.float64))
    assert _cosine(bred_vectors(step, x0, x0 @ a_t, amplitude=0.1, cycles=1, seed=0, members=1).cur, q[:, 0])[0] < 0.99


def test_bred_pair_of_a_two_level_model_is_the_companion_eigenvector():
    """x_{t+1} = A x_t + B x_{t−1}; per mode λ² = aλ + b; the dominant mode has δ_prev = δ_cur / λ₁."""
    eigen_a, eigen_b = [1.2, 0.5, 0.3, 0.2], [0.3, 0.2, 0.1, 0.1]
    q, a, b = _modal_matrices(eigen_a, eigen_b, seed=1)
    lam = (eigen_a[0] + np.sqrt(eigen_a[0] ** 2 + 4 * eigen_b[0])) / 2
    a_t, b_t = torch.as_tensor(a.T), torch.as_tensor(b.T)
    step = lambda prev, cur: cur @ a_t + prev @ b_t  # noqa: E731
    x0 = torch.linspace(0.5, 1.0, 4, dtype=torch.float64)[None]
    result = bred_vectors(step, x0, x0, amplitude=1.0, cycles=30, seed=5, members=3)
    assert np.all(_cosine(result.cur, q[:, 0]) > 0.9999)
    torch.testing.assert_close(result.prev, result.cur / lam, rtol=1e-4, atol=1e-6)


def test_bred_vectors_on_tuple_states_seeded_per_member():
    grow = torch.tensor([2.0, 1.0, 0.5])

    def step(prev, cur):  # (upper (B, 3), surface (B, 2)): the growing mode is the first upper entry
        return cur[0] * grow, cur[1] * 0.5

    state = (torch.ones(1, 3), torch.ones(1, 2))
    three = bred_vectors(step, state, state, amplitude=1.0, cycles=12, seed=9, members=3)
    alone = bred_vectors(step, state, state, amplitude=1.0, cycles=12, seed=9, members=[2])
    torch.testing.assert_close(alone.cur[0], three.cur[0][2:3])
    upper, surface = three.cur
    assert torch.all(upper[:, 0].abs() > 0.999 * np.sqrt(5))  # all the norm (rms over 5 values) in one entry
    assert float(surface.abs().max()) < 1e-3
    torch.testing.assert_close(three.control_cur[0], torch.ones(1, 3) * grow**12)


def test_bad_input():
    with pytest.raises(BdlensError, match="upper_std"):
        gaussian_perturbation([1.0, 2.0], SURFACE_STD, GRID, seed=0, members=1)
    with pytest.raises(BdlensError, match="cycles"):
        bred_vectors(lambda p, c: c, torch.ones(1, 2), torch.ones(1, 2), amplitude=1.0, cycles=0, seed=0, members=1)
    with pytest.raises(BdlensError, match="batch size 1"):
        bred_vectors(lambda p, c: c, torch.ones(2, 2), torch.ones(2, 2), amplitude=1.0, cycles=1, seed=0, members=1)
