"""The 3D Earth-Specific Transformer (3DEST), the Pangu-Weather backbone (docs/science.md §3).

Inputs, normalised per variable and level:
  upper   (B, T_in, V_u, Z, H, W)   the T_in input times, oldest first (X_{t−Δ}, X_t)
  surface (B, T_in, V_s, H, W)
  constants (N_c, H, W) or (B, N_c, H, W), optional, concatenated to the surface channels.
Output X_{t+Δ} in the same normalised layout for one time: upper (B, V_u, Z, H, W), surface
(B, V_s, H, W) — the per-time layout of ``bdlens.data``, so the input of the next step is a
``torch.stack`` of two outputs along dim 1.

Pipeline: patch embedding (surface = pressure token 0, levels from the ground up as in Pangu-Weather
unless the config's ``convention`` is ``"legacy"``; see :class:`~bdlens.models.ModelConfig`) → stage 1 (C) → merge 2×2 (2C) → stage 2 →
stage 2 → up-sample (C) → stage 1 → concatenate the stage-1 encoder output (2C) → patch recovery.
With ``conditioning_dim`` > 0 (the diffusion denoiser) every block's two layer norms are adaptive
layer norms driven by a conditioning vector (B, D) passed as ``conditioning``.
Every parameter is a plain ``nn.Linear`` / ``nn.Conv*`` weight or ``nn.Parameter`` and the forward
pass has no in-place updates and no data-dependent control flow, so it runs under
``torch.func.functional_call`` + ``torch.func.vmap`` over stacked per-member weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bdlens.errors import BdlensError
from bdlens.models.attention import EarthAttention3D, shift_mask, window_partition, window_reverse
from bdlens.models.config import ModelConfig
from bdlens.models.layers import (
    AdaptiveLayerNorm,
    DropPath,
    Mlp,
    PatchEmbedding,
    PatchMerging,
    PatchRecovery,
    PatchUpsample,
    ceil_to,
    pad_end,
)


class EarthSpecificBlock(nn.Module):
    """One res-post-norm block: x += DropPath(LN(Attn(x))); x += DropPath(LN(MLP(x))).

    ``shape`` is the (Z, H, W) token count; levels and latitudes are zero-padded at the end to whole
    windows for the attention and cropped afterwards. A shifted block rolls by
    ``shift_sign``·(wz/2, wh/2, ww/2) (each axis by its own half window; +1 as in Pangu's pseudocode,
    −1 for legacy models) before partitioning and rolls back afterwards. With ``cond_dim`` > 0 both layer norms are :class:`AdaptiveLayerNorm` s of the conditioning vector.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: tuple[int, int, int],
        shape: tuple[int, int, int],
        shifted: bool,
        mlp_ratio: float,
        drop_path: float,
        shift_sign: int = 1,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.window = tuple(window)
        self.shape = tuple(shape)
        self.padded = (ceil_to(shape[0], window[0]), ceil_to(shape[1], window[1]), shape[2])
        self.shift = tuple(shift_sign * (w // 2) for w in window) if shifted else (0, 0, 0)
        n_types = (self.padded[0] // window[0]) * (self.padded[1] // window[1])
        self.attn = EarthAttention3D(dim, heads, self.window, n_types)
        self.norm1 = AdaptiveLayerNorm(dim, cond_dim) if cond_dim else nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.norm2 = AdaptiveLayerNorm(dim, cond_dim) if cond_dim else nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(self.padded[:2], self.window, shift_sign) if shifted else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """x: (B, Z, H, W, C), cond: (B, D) for adaptive layer norms → same shape as x."""
        z, h, _ = self.shape
        y = pad_end(x, {-4: self.padded[0], -3: self.padded[1]})
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=(1, 2, 3))
        y = window_reverse(self.attn(window_partition(y, self.window), self.mask), self.window, self.padded)
        if any(self.shift):
            y = torch.roll(y, shifts=tuple(-s for s in self.shift), dims=(1, 2, 3))
        y = y[:, :z, :h]
        x = x + self.drop_path(self._norm(self.norm1, y, cond))
        return x + self.drop_path(self._norm(self.norm2, self.mlp(x), cond))

    @staticmethod
    def _norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        return norm(x, cond) if isinstance(norm, AdaptiveLayerNorm) else norm(x)


class EarthSpecificStage(nn.Module):
    """``depth`` blocks at one resolution, every second one shifted; optional gradient checkpointing."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        window: tuple[int, int, int],
        shape: tuple[int, int, int],
        mlp_ratio: float,
        drop_path: list[float],
        use_checkpoint: bool = False,
        shift_sign: int = 1,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            EarthSpecificBlock(dim, heads, window, shape, i % 2 == 1, mlp_ratio, drop_path[i], shift_sign, cond_dim)
            for i in range(depth)
        )

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """x: (B, Z, H, W, C), cond: (B, D) or None → same shape as x."""
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False)
            else:
                x = block(x, cond)
        return x


class EarthSpecificTransformer(nn.Module):
    """The 3DEST built from a :class:`ModelConfig`; see the module docstring for the tensor layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        dim = c.embed_dim
        stage1, stage2 = c.token_shape(1), c.token_shape(2)
        rates = c.drop_path_rates()
        stage = dict(window=c.window, mlp_ratio=c.mlp_ratio, use_checkpoint=c.checkpoint, shift_sign=1 if c.ground_up else -1,
                     cond_dim=c.conditioning_dim)
        self.embed = PatchEmbedding(
            c.n_input_times * c.n_upper, c.n_input_times * c.n_surface + len(c.constants), dim, c.patch, c.ground_up
        )
        self.encoder1 = EarthSpecificStage(dim, c.depths[0], c.heads[0], shape=stage1, drop_path=rates[0], **stage)
        self.merge = PatchMerging(dim)
        self.encoder2 = EarthSpecificStage(2 * dim, c.depths[1], c.heads[1], shape=stage2, drop_path=rates[1], **stage)
        self.decoder2 = EarthSpecificStage(2 * dim, c.depths[2], c.heads[2], shape=stage2, drop_path=rates[2], **stage)
        self.upsample = PatchUpsample(dim, stage1[1])
        self.decoder1 = EarthSpecificStage(dim, c.depths[3], c.heads[3], shape=stage1, drop_path=rates[3], **stage)
        self.recovery = PatchRecovery(2 * dim, c.n_upper, c.n_surface, c.patch, (c.n_levels, c.nlat), c.ground_up)
        self.apply(_init_weights)

    def forward(
        self, upper: Tensor, surface: Tensor, constants: Tensor | None = None, conditioning: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B, T_in, V_u, Z, H, W), (B, T_in, V_s, H, W), constants, conditioning (B, conditioning_dim) when
        the config has one → X_{t+Δ}: (B, V_u, Z, H, W), (B, V_s, H, W)."""
        self._check_inputs(upper, surface, constants)
        if (conditioning is None) != (self.config.conditioning_dim == 0):
            raise BdlensError(f"this model takes a conditioning vector of width {self.config.conditioning_dim} (0: none); got "
                              f"{None if conditioning is None else tuple(conditioning.shape)}")
        b = upper.shape[0]
        surface_in = surface.reshape(b, -1, *surface.shape[-2:])
        if constants is not None:
            surface_in = torch.cat([surface_in, constants.expand(b, -1, -1, -1).to(surface_in.dtype)], dim=1)
        x = self.embed(upper.reshape(b, -1, *upper.shape[-3:]), surface_in)
        skip = self.encoder1(x, conditioning)
        x = self.decoder2(self.encoder2(self.merge(skip), conditioning), conditioning)
        x = self.decoder1(self.upsample(x), conditioning)
        out_upper, out_surface = self.recovery(torch.cat([skip, x], dim=-1))
        if self.config.residual:
            out_upper = out_upper + upper[:, -1]
            out_surface = out_surface + surface[:, -1]
        return out_upper, out_surface

    def step(
        self, previous: tuple[Tensor, Tensor] | None, current: tuple[Tensor, Tensor], constants: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One model step from per-time states (upper (B, V_u, Z, H, W), surface (B, V_s, H, W)).

        ``previous`` is X_{t−Δ} (ignored by one-input-time models), ``current`` is X_t; returns
        X_{t+Δ} as the same pair. This is the ``callable(prev, current)`` that
        :func:`bdlens.models.lead_time.rollout` expects (bind ``constants`` with a lambda).
        """
        times = [current] if self.config.n_input_times == 1 else [previous, current]
        if any(t is None for t in times):
            raise BdlensError("this model takes two input times: pass the state at t−Δ as `previous`")
        return self(torch.stack([t[0] for t in times], 1), torch.stack([t[1] for t in times], 1), constants)

    def _check_inputs(self, upper: Tensor, surface: Tensor, constants: Tensor | None) -> None:
        c = self.config
        want_upper = (c.n_input_times, c.n_upper, c.n_levels, c.nlat, c.nlon)
        want_surface = (c.n_input_times, c.n_surface, c.nlat, c.nlon)
        if upper.ndim != 6 or tuple(upper.shape[1:]) != want_upper:
            raise BdlensError(
                f"upper-air input has shape {tuple(upper.shape)}; expected (B, T_in, V_u, Z, H, W) = (B, *{want_upper})"
            )
        if surface.ndim != 5 or tuple(surface.shape[1:]) != want_surface:
            raise BdlensError(
                f"surface input has shape {tuple(surface.shape)}; expected (B, T_in, V_s, H, W) = (B, *{want_surface})"
            )
        n_const = len(c.constants)
        if (constants is None) != (n_const == 0) or (
            constants is not None and tuple(constants.shape[-3:]) != (n_const, c.nlat, c.nlon)
        ):
            got = None if constants is None else tuple(constants.shape)
            raise BdlensError(
                f"constants have shape {got}; the config expects {n_const} constant fields {c.constants} "
                f"of shape ({c.nlat}, {c.nlon})"
            )


def _init_weights(module: nn.Module) -> None:
    # Pangu/Swin initialisation: truncated normal linear weights, zero biases.
    # Adaptive layer norms start as plain ones (``apply`` visits their linear map first).
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, AdaptiveLayerNorm):
        module.reset_parameters()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (works for models built on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
