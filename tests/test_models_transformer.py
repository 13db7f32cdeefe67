"""The 3DEST end to end: shapes, padding/cropping, longitude equivariance, vmap, autocast, checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from bdlens.errors import BdlensError
from bdlens.models import EarthSpecificTransformer, ModelConfig, count_parameters
from bdlens.models.layers import PatchMerging, PatchRecovery, PatchUpsample

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter 3DEST on a 32×12 grid with 4 levels (padding in pressure)."""
    settings = dict(
        upper_variables=["geopotential", "temperature"],
        levels=[250, 500, 850, 925],
        surface_variables=["2m_temperature", "10m_u_component_of_wind", "mean_sea_level_pressure"],
        nlat=12, nlon=32, n_input_times=2, embed_dim=8, depths=[2, 2, 2, 2], heads=[2, 2, 2, 2],
        window=[2, 2, 4], patch=[2, 2, 2], mlp_ratio=2.0,
    )
    return ModelConfig.from_dict(settings | overrides)


def inputs(config: ModelConfig, batch: int = 1, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, h, w = config.n_input_times, config.nlat, config.nlon
    upper = torch.randn(batch, t, config.n_upper, config.n_levels, h, w, generator=g, dtype=dtype)
    surface = torch.randn(batch, t, config.n_surface, h, w, generator=g, dtype=dtype)
    constants = torch.randn(len(config.constants), h, w, generator=g, dtype=dtype) if config.constants else None
    return upper, surface, constants


def test_demo_config_output_shapes():
    config = ModelConfig.from_yaml(CONFIGS / "model_demo.yaml")
    assert (config.nlon, config.nlat, config.n_levels, config.n_input_times) == (64, 32, 8, 2)
    torch.manual_seed(0)
    model = EarthSpecificTransformer(config).eval()
    with torch.no_grad():
        upper, surface = model(*inputs(config, batch=2)[:2])
    assert upper.shape == (2, 4, 8, 32, 64) and surface.shape == (2, 4, 32, 64)
    assert torch.isfinite(upper).all() and torch.isfinite(surface).all()


def test_pangu_configuration_on_meta_device():
    config = ModelConfig.from_yaml(CONFIGS / "model_pangu.yaml")
    assert (config.embed_dim, config.depths, config.heads) == (192, (2, 6, 6, 2), (6, 12, 12, 6))
    assert (config.window, config.patch, config.n_input_times) == ((2, 6, 12), (2, 4, 4), 1)
    assert config.token_shape(1) == (8, 181, 360) and config.token_shape(2) == (8, 91, 180)
    with torch.device("meta"):
        model = EarthSpecificTransformer(config)
        upper, surface = model(*inputs(config))
    assert upper.shape == (1, 5, 13, 721, 1440) and surface.shape == (1, 4, 721, 1440)
    # Pangu-Weather's published size is about 64.2 M parameters, most in the Earth-specific bias.
    assert 64.0e6 < count_parameters(model) < 64.4e6
    bias = sum(block.attn.earth_bias.numel() for block in model.modules() if hasattr(block, "attn"))
    assert bias > count_parameters(model) / 2


@pytest.mark.parametrize("odd", [{}, {"nlat": 9, "levels": [250, 500, 850]}])
def test_rolling_by_a_stage2_longitude_window_rolls_the_output(odd):
    config = tiny_config(constants=["land_sea_mask"], **odd)
    torch.manual_seed(1)
    model = EarthSpecificTransformer(config).double().eval()
    upper, surface, constants = inputs(config, dtype=torch.float64)
    shift = config.window[2] * 2 * config.patch[2]  # grid points of one stage-2 window
    with torch.no_grad():
        ref = model(upper, surface, constants)
        rolled = model(upper.roll(shift, -1), surface.roll(shift, -1), constants.roll(shift, -1))
        half = model(upper.roll(shift // 2, -1), surface.roll(shift // 2, -1), constants.roll(shift // 2, -1))
    for out, expected in zip(rolled, ref, strict=True):
        torch.testing.assert_close(out, expected.roll(shift, -1))
    # Half a stage-2 window shifts the stage-2 windows themselves: not an exact symmetry.
    assert not torch.allclose(half[0], ref[0].roll(shift // 2, -1))


def test_odd_latitudes_and_levels_pad_at_the_end_and_crop():
    config = tiny_config(nlat=9, levels=[250, 500, 850], window=[2, 2, 4])
    assert config.token_shape(1) == (3, 5, 16) and config.token_shape(2) == (3, 3, 8)
    torch.manual_seed(2)
    model = EarthSpecificTransformer(config).eval()
    upper, surface, _ = inputs(config)
    with torch.no_grad():
        out_upper, out_surface = model(upper, surface)
        # Padding goes at the end: the south-most rows of the embedding do not see it, nor do the lowest
        # levels (they come first in Pangu's ground-up order, so the padded level is above 250 hPa).
        stacked_upper, stacked_surface = upper.reshape(1, 4, 3, 9, 32), surface.reshape(1, 6, 9, 32)
        tokens = model.embed(stacked_upper, stacked_surface)
        padded_upper = F.pad(stacked_upper.flip(2), (0, 0, 0, 1, 0, 1))
        padded_surface = F.pad(stacked_surface, (0, 0, 0, 1))
        torch.testing.assert_close(tokens[:, 1:].permute(0, 4, 1, 2, 3), model.embed.upper(padded_upper))
        torch.testing.assert_close(tokens[:, 0].permute(0, 3, 1, 2), model.embed.surface(padded_surface))
    assert out_upper.shape == (1, 2, 3, 9, 32) and out_surface.shape == (1, 3, 9, 32)


@pytest.mark.parametrize("ground_up", [True, False])
def test_patch_recovery_crops_the_end(ground_up):
    torch.manual_seed(3)
    recovery = PatchRecovery(4, 2, 3, (2, 2, 2), (3, 9), ground_up)
    tokens = torch.randn(1, 3, 5, 4, 4)
    upper, surface = recovery(tokens)
    full = recovery.upper(tokens[:, 1:].permute(0, 4, 1, 2, 3))[:, :, :3, :9]
    # Pangu's tokens run from the ground up; the output levels are in ascending hPa again.
    torch.testing.assert_close(upper, full.flip(2) if ground_up else full)
    torch.testing.assert_close(surface, recovery.surface(tokens[:, 0].permute(0, 3, 1, 2))[:, :, :9])


def test_patch_merging_and_upsample_against_explicit_gathering():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 5, 4, 3)  # odd latitude count: merging pads one row at the end
    merge = PatchMerging(3)
    padded = F.pad(x, (0, 0, 0, 0, 0, 1))
    gathered = torch.cat([padded[:, :, dh::2, dw::2] for dh in (0, 1) for dw in (0, 1)], dim=-1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(gathered)))
    up = PatchUpsample(3, nlat=5)
    y = torch.randn(1, 2, 3, 2, 6)
    expanded = up.expand(y)
    shuffled = torch.empty(1, 2, 6, 4, 3)
    for dh in (0, 1):
        for dw in (0, 1):
            shuffled[:, :, dh::2, dw::2] = expanded[..., (2 * dh + dw) * 3 : (2 * dh + dw + 1) * 3]
    torch.testing.assert_close(up(y), up.linear(up.norm(shuffled[:, :, :5])))


def test_vmap_over_stacked_parameters_equals_separate_calls():
    config = tiny_config(n_input_times=1, residual=True)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(EarthSpecificTransformer(config).eval())
    params, _ = stack_module_state(models)
    buffers = dict(models[0].named_buffers())
    upper, surface, _ = inputs(config, batch=2)

    def member(p, u, s):
        return functional_call(models[0], (p, buffers), (u, s))

    with torch.no_grad():
        batched = vmap(member, in_dims=(0, None, None))(params, upper, surface)
        for k, model in enumerate(models):
            separate = model(upper, surface)
            torch.testing.assert_close(batched[0][k], separate[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched[1][k], separate[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0][0], batched[0][1])
    # Gradients with respect to the stacked weights are the members' own gradients.
    vmap(member, in_dims=(0, None, None))(params, upper, surface)[0].square().sum().backward()
    for k, model in enumerate(models):
        model(upper, surface)[0].square().sum().backward()
        name = "decoder2.blocks.1.attn.earth_bias"
        torch.testing.assert_close(params[name].grad[k], model.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_tracks_float32():
    config = tiny_config()
    torch.manual_seed(5)
    model = EarthSpecificTransformer(config).eval()
    upper, surface, _ = inputs(config)
    with torch.no_grad():
        ref = model(upper, surface)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(upper, surface)[0]
    assert torch.isfinite(low).all()
    assert torch.corrcoef(torch.stack([ref.flatten(), low.float().flatten()]))[0, 1] > 0.99


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for use in (False, True):
        torch.manual_seed(6)
        model = EarthSpecificTransformer(tiny_config(checkpoint=use)).train()
        upper, surface, _ = inputs(model.config)
        out = model(upper, surface)
        (out[0].square().mean() + out[1].abs().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_residual_step_adds_the_increment_to_the_latest_state():
    config = tiny_config()
    torch.manual_seed(7)
    plain = EarthSpecificTransformer(config).eval()
    residual = EarthSpecificTransformer(tiny_config(residual=True)).eval()
    residual.load_state_dict(plain.state_dict())
    upper, surface, _ = inputs(config)
    previous, current = (upper[:, 0], surface[:, 0]), (upper[:, 1], surface[:, 1])
    with torch.no_grad():
        increment = plain(upper, surface)
        stepped = residual.step(previous, current)
    torch.testing.assert_close(stepped[0], current[0] + increment[0])
    torch.testing.assert_close(stepped[1], current[1] + increment[1])
    with pytest.raises(BdlensError, match="two input times"):
        residual.step(None, current)


def test_wrong_input_shapes_are_clear_errors():
    config = tiny_config()
    model = EarthSpecificTransformer(config)
    upper, surface, _ = inputs(config)
    with pytest.raises(BdlensError, match="upper-air input"):
        model(upper[:, :1], surface)
    with pytest.raises(BdlensError, match="constants"):
        model(upper, surface, torch.zeros(1, 12, 32))


def _surface_token_response(config: ModelConfig, level: int) -> float:
    """Change of the surface token after the embedding and the first (unshifted) block when the input
    at pressure ``level`` changes."""
    torch.manual_seed(5)
    model = EarthSpecificTransformer(config).double().eval()
    upper, surface, _ = inputs(config, dtype=torch.float64)
    bumped = upper.clone()
    bumped[:, :, :, config.levels.index(level)] += 1.0

    def surface_token(u: torch.Tensor) -> torch.Tensor:
        tokens = model.embed(u.flatten(1, 2), surface.flatten(1, 2))
        return model.encoder1.blocks[0](tokens)[:, 0]

    with torch.no_grad():
        return float((surface_token(bumped) - surface_token(upper)).abs().max())


def test_levels_enter_from_the_ground_up_so_the_surface_attends_to_1000_hpa():
    """Pangu's order (1000 → 50 hPa): the surface token shares its vertical window with the lowest levels.
    The legacy order (ascending hPa) put it beside the top levels, never seeing 1000 hPa in one block."""
    levels = [50, 100, 500, 850, 925, 1000]  # three level tokens of two levels, plus the surface token
    pangu = tiny_config(levels=levels, window=[2, 2, 4])
    legacy = tiny_config(levels=levels, window=[2, 2, 4], convention="legacy")
    assert pangu.convention == "pangu" and pangu.token_shape(1)[0] == 4
    assert _surface_token_response(pangu, 1000) > 1e-3
    assert _surface_token_response(pangu, 50) == 0.0
    assert _surface_token_response(legacy, 1000) == 0.0
    assert _surface_token_response(legacy, 50) > 1e-3


@pytest.mark.parametrize("convention", ["pangu", "legacy"])
def test_embedding_then_recovery_keeps_every_level_in_place(convention):
    """With one grid point per patch and identity weights, recovery ∘ embedding is the identity: the
    level flip of Pangu's order is undone on the way out."""
    config = tiny_config(n_input_times=1, embed_dim=6, heads=[1, 1, 1, 1], patch=[1, 1, 1], convention=convention)
    model = EarthSpecificTransformer(config)
    upper, surface, _ = inputs(config, batch=2)
    with torch.no_grad():
        for conv in (model.embed.upper, model.embed.surface, model.recovery.upper, model.recovery.surface):
            conv.bias.zero_()
            conv.weight.zero_()
        for i in range(config.n_upper):
            model.embed.upper.weight[i, i] = 1.0
            model.recovery.upper.weight[i, i] = 1.0  # the recovery reads the 2C channels of [skip, decoder]
        for i in range(config.n_surface):
            model.embed.surface.weight[i, i] = 1.0
            model.recovery.surface.weight[i, i] = 1.0
        tokens = model.embed(upper[:, 0], surface[:, 0])
        out_upper, out_surface = model.recovery(torch.cat([tokens, torch.zeros_like(tokens)], dim=-1))
    torch.testing.assert_close(out_upper, upper[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out_surface, surface[:, 0], rtol=0, atol=0)
