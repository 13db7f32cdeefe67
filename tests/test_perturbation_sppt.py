"""SPPT on the network tendency (bdlens.perturbation.sppt): identities checked against brute force."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bdlens.errors import BdlensError
from bdlens.grid import GRIDS, UPPER_AIR_VARIABLES, WB2_LEVELS, lat_weights
from bdlens.perturbation.patterns import UnresolvedScaleWarning
from bdlens.perturbation.sppt import R_DRY, SPPT, SPPTConfig, VerticalTaper, apply_sppt, load_sppt_config

GRID = GRIDS["64x32"]
LAT = GRID.latitudes()
SURFACE = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind", "mean_sea_level_pressure")
BASE = {  # typical magnitudes (SI) so the constructed states look physical
    "geopotential": 5e4,
    "temperature": 250.0,
    "u_component_of_wind": 10.0,
    "v_component_of_wind": 5.0,
    "specific_humidity": 3e-3,
    "2m_temperature": 285.0,
    "10m_u_component_of_wind": 5.0,
    "10m_v_component_of_wind": 3.0,
    "mean_sea_level_pressure": 101325.0,
}


def _states(batch: int = 2, seed: int = 0, upper_vars=UPPER_AIR_VARIABLES, levels=WB2_LEVELS):
    """(x_upper, x_surface, f_upper, f_surface): a current state and a network state, float32."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, GRID.nlat, GRID.nlon)

    def field(name, *extra):
        base = BASE[name]
        x = base * (1 + 0.05 * torch.randn(*shape[:1], *extra, *shape[1:], generator=g))
        return x, x + 0.02 * base * torch.randn(x.shape, generator=g)

    ups = [field(n, len(levels)) for n in upper_vars]
    sfc = [field(n) for n in SURFACE]
    stack = lambda items, i: torch.stack([p[i] for p in items], dim=1)  # noqa: E731
    return stack(ups, 0), stack(sfc, 0), stack(ups, 1), stack(sfc, 1)


def _pattern(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(batch, GRID.nlat, GRID.nlon, generator=g)).clamp(-1, 1)


def _apply(states, pattern, config=None, upper_vars=UPPER_AIR_VARIABLES, levels=WB2_LEVELS):
    return apply_sppt(
        *states, pattern, levels_hpa=levels, upper_variables=upper_vars, surface_variables=SURFACE,
        latitude=LAT, config=config,
    )


def test_taper_values():
    taper = VerticalTaper()
    mu = dict(zip(WB2_LEVELS, taper(WB2_LEVELS), strict=True))
    assert mu[50] == mu[100] == mu[1000] == 0.0
    assert all(mu[p] == 1.0 for p in (200, 250, 300, 400, 500, 600, 700, 850))
    x925 = math.log(1000 / 925) / math.log(1000 / 850)
    x150 = math.log(150 / 100) / math.log(200 / 100)
    assert mu[925] == pytest.approx(math.sin(math.pi / 2 * x925) ** 2)
    assert mu[150] == pytest.approx(math.sin(math.pi / 2 * x150) ** 2)
    with pytest.raises(ValueError):
        VerticalTaper(top_full_hpa=900.0)


def test_zero_tendency_gives_zero_perturbation():
    x_upper, x_surface, _, _ = _states()
    config = SPPTConfig(surface_taper_pressure_hpa=500.0)  # surface perturbed too
    upper, surface = _apply((x_upper, x_surface, x_upper.clone(), x_surface.clone()), _pattern(), config)
    torch.testing.assert_close(upper, x_upper, rtol=0, atol=0)
    torch.testing.assert_close(surface, x_surface, rtol=0, atol=0)


def test_perturbation_is_taper_times_pattern_times_tendency_and_zero_where_tapered():
    states = _states()
    x_upper, x_surface, f_upper, f_surface = states
    r = _pattern()
    upper, surface = _apply(states, r)
    mu = VerticalTaper()(WB2_LEVELS)
    for name in ("temperature", "u_component_of_wind", "v_component_of_wind"):
        i = UPPER_AIR_VARIABLES.index(name)
        tendency = (f_upper[:, i] - x_upper[:, i]).double().numpy()
        expected = f_upper[:, i].double().numpy() + mu[None, :, None, None] * r[:, None].double().numpy() * tendency
        np.testing.assert_allclose(upper[:, i].double().numpy(), expected, rtol=2e-6, atol=1e-5 * BASE[name])
    # Geopotential aloft moves with the layers below it (hydrostatic test); everything else is untouched.
    others = [i for i, name in enumerate(UPPER_AIR_VARIABLES) if name != "geopotential"]
    for level in (50, 100, 1000):
        k = WB2_LEVELS.index(level)
        torch.testing.assert_close(upper[:, others, k], f_upper[:, others, k], rtol=0, atol=0)
    torch.testing.assert_close(surface, f_surface, rtol=0, atol=0)  # μ(1000 hPa) = 0 by default
    assert not torch.equal(upper[:, :, WB2_LEVELS.index(500)], f_upper[:, :, WB2_LEVELS.index(500)])


def test_perturbed_wind_tendency_is_parallel_to_the_network_wind_tendency():
    states = tuple(s.double() for s in _states())
    x_upper, _, f_upper, _ = states
    upper, _ = _apply(states, _pattern().double())
    iu, iv = UPPER_AIR_VARIABLES.index("u_component_of_wind"), UPPER_AIR_VARIABLES.index("v_component_of_wind")
    du, dv = f_upper[:, iu] - x_upper[:, iu], f_upper[:, iv] - x_upper[:, iv]
    pu, pv = upper[:, iu] - x_upper[:, iu], upper[:, iv] - x_upper[:, iv]
    cross = pu * dv - pv * du  # zero iff parallel
    assert float(cross.abs().max()) < 1e-10 * float((du**2 + dv**2).max())
    assert float((pu - du).abs().max()) > 0.01  # m/s: the winds were perturbed


def test_humidity_never_negative():
    x_upper, x_surface, f_upper, f_surface = _states()
    iq = UPPER_AIR_VARIABLES.index("specific_humidity")
    f_upper[:, iq] = x_upper[:, iq] * 0.2  # a strong drying tendency: (1 + r)·Δ overshoots where r > 0.25
    r = torch.ones(2, GRID.nlat, GRID.nlon)
    upper, _ = _apply((x_upper, x_surface, f_upper, f_surface), r)
    assert float(upper[:, iq].min()) >= 0.0
    mu = torch.as_tensor(VerticalTaper()(WB2_LEVELS), dtype=torch.float32)[None, :, None, None]
    unclipped = x_upper[:, iq] + (1 + mu) * (f_upper[:, iq] - x_upper[:, iq])
    assert float(unclipped.min()) < 0  # the constraint was needed
    torch.testing.assert_close(upper[:, iq], unclipped.clamp_min(0.0))


def test_global_mean_surface_pressure_unchanged():
    states = _states(batch=3)
    config = SPPTConfig(surface_taper_pressure_hpa=500.0)  # μ = 1 for surface fields
    r = _pattern(batch=3)
    _, surface = _apply(states, r, config)
    ip = SURFACE.index("mean_sea_level_pressure")
    w = lat_weights(LAT)[:, None]
    f_p = states[3][:, ip].double().numpy()
    out = surface[:, ip].double().numpy()
    raw = f_p + r.double().numpy() * (f_p - states[1][:, ip].double().numpy())
    mean = lambda a: (a * w).mean(axis=(-2, -1))  # noqa: E731
    assert np.all(np.abs(mean(raw) - mean(f_p)) / mean(f_p) > 1e-6)  # without the fix it changes
    np.testing.assert_allclose(mean(out), mean(f_p), rtol=1e-6)
    assert np.abs(out - f_p).max() > 10.0  # still perturbed (Pa)


def _layer_thickness_change(upper, f_upper, levels, moist):
    """Brute force: R_d ½(δT_v,k + δT_v,k+1) ln(p_{k+1}/p_k) and the actual change of Φ_k − Φ_{k+1}."""
    iz, it = UPPER_AIR_VARIABLES.index("geopotential"), UPPER_AIR_VARIABLES.index("temperature")
    iq = UPPER_AIR_VARIABLES.index("specific_humidity")
    u, f = upper.double().numpy(), f_upper.double().numpy()
    tv = lambda s: s[:, it] * (1 + 0.608 * s[:, iq]) if moist else s[:, it]  # noqa: E731
    dtv = tv(u) - tv(f)
    expected, actual = [], []
    for k in range(len(levels) - 1):
        expected.append(R_DRY * 0.5 * (dtv[:, k] + dtv[:, k + 1]) * math.log(levels[k + 1] / levels[k]))
        actual.append((u[:, iz, k] - u[:, iz, k + 1]) - (f[:, iz, k] - f[:, iz, k + 1]))
    return np.stack(expected), np.stack(actual)


def test_geopotential_perturbation_is_hydrostatic():
    states = _states()
    upper, _ = _apply(states, _pattern())
    expected, actual = _layer_thickness_change(upper, states[2], WB2_LEVELS, moist=True)
    assert np.abs(expected).max() > 1.0  # m²/s²: a real perturbation
    np.testing.assert_allclose(actual, expected, atol=0.05)  # float32 Φ ≈ 5e4 has a 0.004 m²/s² resolution
    iz = UPPER_AIR_VARIABLES.index("geopotential")
    torch.testing.assert_close(upper[:, iz, -1], states[2][:, iz, -1], rtol=0, atol=0)  # μ(1000) = 0


def test_vertically_constant_factor_scales_a_hydrostatic_tendency():
    """With μ ≡ 1 and a dry, hydrostatic network tendency, δΦ = r·ΔΦ (the classic same-factor SPPT)."""
    upper_vars = ("geopotential", "temperature")
    x_upper, x_surface, f_upper, f_surface = (s.double() for s in _states(upper_vars=upper_vars))
    levels = np.asarray(WB2_LEVELS, dtype=np.float64)
    dt = f_upper[:, 1] - x_upper[:, 1]
    dz = torch.zeros_like(dt)
    dz[:, -1] = 30.0 * torch.randn(dz[:, -1].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for k in range(len(levels) - 2, -1, -1):
        dz[:, k] = dz[:, k + 1] + R_DRY * 0.5 * (dt[:, k] + dt[:, k + 1]) * math.log(levels[k + 1] / levels[k])
    f_upper[:, 0] = x_upper[:, 0] + dz
    flat = SPPTConfig(taper=VerticalTaper(top_zero_hpa=10, top_full_hpa=20, surface_full_hpa=1000, surface_zero_hpa=1100))
    r = _pattern().double()
    upper, _ = _apply((x_upper, x_surface, f_upper, f_surface), r, flat, upper_vars=upper_vars)
    torch.testing.assert_close(upper[:, 0], f_upper[:, 0] + r[:, None] * dz, rtol=1e-10, atol=1e-8)


def test_perturbation_larger_where_tendency_larger():
    """Tendency 10× larger in the northern hemisphere → perturbation ≈ 10× larger there."""
    x_upper, x_surface, _, _ = _states(batch=8)
    it, k = UPPER_AIR_VARIABLES.index("temperature"), WB2_LEVELS.index(500)
    north = torch.as_tensor(LAT > 0)[:, None]
    f_upper = x_upper.clone()
    f_upper[:, it, k] += torch.where(north, 5.0, 0.5)
    config = SPPTConfig(scales=[{"sigma": 0.3, "tau_hours": 72, "length_km": 1000}])
    sppt = SPPT(GRID, WB2_LEVELS, UPPER_AIR_VARIABLES, SURFACE, config)
    upper, _ = sppt.perturb(sppt.init(seed=0, members=8), x_upper, x_surface, f_upper, x_surface.clone())
    size = (upper[:, it, k] - f_upper[:, it, k]).abs()
    w = torch.as_tensor(lat_weights(LAT), dtype=torch.float32)[:, None].expand(GRID.nlat, GRID.nlon)
    north_mean = float((size * w)[:, north.expand_as(w)].mean() / w[north.expand_as(w)].mean())
    south_mean = float((size * w)[:, ~north.expand_as(w)].mean() / w[~north.expand_as(w)].mean())
    assert north_mean / south_mean == pytest.approx(10.0, rel=0.3)  # sampling of |r| over 8 members


def test_sppt_class_config_and_errors(tmp_path):
    config = load_sppt_config("perturbation_sppt")
    assert config == SPPTConfig()
    with pytest.warns(UserWarning, match="not resolved"):
        sppt = SPPT("64x32", WB2_LEVELS, UPPER_AIR_VARIABLES, SURFACE, config)
    states = _states(batch=3)
    batch3, alone = sppt.step(sppt.init(4, 3)), sppt.step(sppt.init(4, [1]))
    torch.testing.assert_close(batch3.coeffs[0][1:2], alone.coeffs[0], rtol=0, atol=0)  # same random draws
    a = sppt.perturb(batch3, *states)
    b = sppt.perturb(alone, *(s[1:2] for s in states))
    # member 1 is member 1 in any batch (up to float32 rounding of batched BLAS calls)
    torch.testing.assert_close(a[0][1:2], b[0], rtol=1e-6, atol=0)
    with pytest.raises(BdlensError, match="do not match"):
        sppt.perturb(sppt.init(4, 3), states[0][:, :3], states[1], states[2][:, :3], states[3])
    bad = tmp_path / "bad.yaml"
    bad.write_text("scales: [{sigma: 0.5, tau_hours: -1, length_km: 500}]\n")
    with pytest.raises(BdlensError, match="invalid SPPT config"):
        load_sppt_config(bad)


def test_shipped_sppt_on_the_demo_levels_against_a_column_by_column_reference():
    """configs/perturbation_sppt.yaml on the demo model's own levels (100…925 hPa, no humidity): the lowest
    level is 925 hPa, where μ ≈ 0.47, so the geopotential perturbation starts from μ r ΔΦ there and every
    level above adds the hypsometric thickness change of its layer."""
    from bdlens.models import ModelConfig

    demo = ModelConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "model_demo.yaml")
    levels, upper_vars = list(demo.levels), demo.upper_variables
    config = load_sppt_config("perturbation_sppt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnresolvedScaleWarning)  # the 500 km scale on the 64×32 grid
        sppt = SPPT(GRID, levels, upper_vars, SURFACE, config)
        state = sppt.step(sppt.init(seed=3, members=2))
        r = sppt.pattern.field(state)[:, 0].double().numpy()
    states = tuple(s.double() for s in _states(upper_vars=upper_vars, levels=levels))
    x_u, x_s, f_u, f_s = (s.numpy() for s in states)
    upper, surface = sppt.perturb(state, *states)

    p = np.asarray(levels, dtype=np.float64)
    ramp = np.clip(np.minimum(np.log(p / 100) / np.log(2), np.log(1000 / p) / np.log(1000 / 850)), 0, 1)
    mu = np.sin(np.pi / 2 * ramp) ** 2  # the shipped taper: 0 at 100 and 1000 hPa, 1 from 200 to 850 hPa
    assert mu[-1] == pytest.approx(0.4681, abs=1e-4) and mu[0] == 0.0
    expected = f_u.copy()
    iz, it = upper_vars.index("geopotential"), upper_vars.index("temperature")
    for v in range(len(upper_vars)):
        for k in range(len(levels)):
            expected[:, v, k] = f_u[:, v, k] + mu[k] * r * (f_u[:, v, k] - x_u[:, v, k])
    dphi = mu[-1] * r * (f_u[:, iz, -1] - x_u[:, iz, -1])  # the bottom level keeps its own SPPT perturbation
    assert np.abs(dphi).max() > 100.0  # m²/s²: the bottom-level term is exercised
    expected[:, iz, -1] = f_u[:, iz, -1] + dphi
    for k in range(len(levels) - 2, -1, -1):  # upwards, layer by layer (dry: T_v = T)
        dt_mean = 0.5 * ((expected[:, it, k] - f_u[:, it, k]) + (expected[:, it, k + 1] - f_u[:, it, k + 1]))
        dphi = dphi + R_DRY * dt_mean * math.log(p[k + 1] / p[k])
        expected[:, iz, k] = f_u[:, iz, k] + dphi
    np.testing.assert_allclose(upper.numpy(), expected, rtol=1e-12, atol=1e-8)
    np.testing.assert_array_equal(surface.numpy(), f_s)  # μ(1000 hPa) = 0: surface fields unperturbed
    assert not np.allclose(f_s, x_s)


def _eddy_variance(x: np.ndarray) -> np.ndarray:
    """Brute force: area-weighted variance about the zonal mean of (..., H, W) maps, per map."""
    w = lat_weights(LAT)
    eddy = x - x.mean(axis=-1, keepdims=True)
    return (eddy**2 * w[:, None]).mean(axis=(-2, -1))


def test_activity_limit_shrinks_each_field_to_its_cap_against_a_brute_force_search():
    states = _states(batch=3, seed=5)
    config = SPPTConfig(surface_taper_pressure_hpa=500.0, hydrostatic=False)  # every field perturbed, each limited alone
    raw_upper, raw_surface = _apply(states, _pattern(batch=3), config)
    flat = lambda u, s: np.concatenate([u.double().numpy().reshape(3, -1, *u.shape[-2:]), s.double().numpy()], axis=1)  # noqa: E731
    f, raw = flat(states[2], states[3]), flat(raw_upper, raw_surface)
    v_f, v_raw = _eddy_variance(f), _eddy_variance(raw)
    # Caps between the unperturbed and the perturbed activity for about half the fields (they bind), and
    # above the perturbed one or below the unperturbed one for the others (those keep s = 1 / must not grow).
    g = np.random.default_rng(0)
    cap = np.where(g.random(v_f.shape) < 0.5, v_f + g.uniform(0.1, 0.9, v_f.shape) * (v_raw - v_f), v_raw * 1.5)
    cap[:, :3] = 0.5 * v_f[:, :3]  # the network alone is already above these caps
    upper, surface = apply_sppt(*states, _pattern(batch=3), levels_hpa=WB2_LEVELS, upper_variables=UPPER_AIR_VARIABLES,
                                surface_variables=SURFACE, latitude=LAT, config=config, activity=torch.as_tensor(cap))
    out = flat(upper, surface)
    grid = np.linspace(0.0, 1.0, 2001)
    checked = 0
    for b in range(3):
        for k in range(f.shape[1]):
            delta = raw[b, k] - f[b, k]
            if np.abs(delta).max() == 0:  # μ = 0 at 1000 and 50 hPa: nothing to limit
                np.testing.assert_array_equal(out[b, k], f[b, k])
                continue
            bound = max(cap[b, k], v_f[b, k])
            admissible = grid[_eddy_variance(f[b, k] + grid[:, None, None] * delta) <= bound * (1 + 1e-9)]
            s_expected = admissible.max() if admissible.size else 0.0
            s = float(((out[b, k] - f[b, k]) * delta).sum() / (delta**2).sum())
            np.testing.assert_allclose(out[b, k], f[b, k] + s * delta, rtol=0, atol=1e-6 * np.abs(f[b, k]).max())
            assert abs(s - s_expected) <= 1e-3, (b, k, s, s_expected)
            assert _eddy_variance(out[b, k]) <= bound * (1 + 1e-5)
            checked += s < 0.999
    assert checked > f.shape[1]  # the limit bound for many fields, not a vacuous check


def test_activity_limit_keeps_the_perturbation_hydrostatic():
    states = _states(seed=7)
    raw_upper, raw_surface = _apply(states, _pattern())
    f = np.concatenate([states[2].double().numpy().reshape(2, -1, GRID.nlat, GRID.nlon), states[3].double().numpy()], axis=1)
    raw = np.concatenate([raw_upper.double().numpy().reshape(2, -1, GRID.nlat, GRID.nlon), raw_surface.double().numpy()], axis=1)
    cap = torch.as_tensor(0.5 * (_eddy_variance(f) + _eddy_variance(raw)))
    upper, _ = apply_sppt(*states, _pattern(), levels_hpa=WB2_LEVELS, upper_variables=UPPER_AIR_VARIABLES,
                          surface_variables=SURFACE, latitude=LAT, activity=cap)
    it = UPPER_AIR_VARIABLES.index("temperature")
    limited = (upper[:, it] - states[2][:, it]).abs().mean() / (raw_upper[:, it] - states[2][:, it]).abs().mean()
    assert 0.05 < float(limited) < 0.95  # the temperature perturbation was shrunk
    expected, actual = _layer_thickness_change(upper, states[2], WB2_LEVELS, moist=True)
    np.testing.assert_allclose(actual, expected, atol=0.05)
