"""Token layers of the 3DEST: patch embedding and recovery, patch merging and up-sampling, DropPath.

Token tensors are (B, Z, H, W, C): pressure (surface token first, then the levels from the ground up in
Pangu's order, or in ascending hPa for legacy models), latitude, longitude, channels.
Levels and latitudes are zero-padded at the end to whole patches and cropped again after recovery;
longitude is never padded (the configuration guarantees whole patches and windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdlens.models.member_linear import Linear


def pad_end(x: Tensor, sizes: dict[int, int]) -> Tensor:
    """Zero-pad dimensions of ``x`` at their end: ``sizes`` maps a (negative) dim to its padded length."""
    pad = [0] * (2 * x.ndim)
    for dim, size in sizes.items():
        pad[2 * (-dim) - 1] = size - x.shape[dim]
    if not any(pad):
        return x
    return F.pad(x, pad[: 2 * max(-dim for dim in sizes)])


def ceil_to(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ≥ n."""
    return -(-n // multiple) * multiple


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``rate``.

    Out of place, so that it also runs under ``torch.func`` transforms (in training under ``vmap``,
    pass ``randomness="different"``).
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) → same shape, each sample's branch kept with probability 1 − rate and rescaled."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.bernoulli(torch.full((x.shape[0],) + (1,) * (x.ndim - 1), keep, dtype=x.dtype, device=x.device))
        return x * mask / keep


class AdaptiveLayerNorm(nn.Module):
    """Layer norm whose scale and shift come from a conditioning vector c (adaptive layer norm, as in
    GenCast and DiT): LN(x)·(1 + γ(c)) + β(c), with γ, β a linear map of c that starts at zero, so a
    fresh block behaves like one with a plain layer norm."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, ..., C), cond: (B, D) → same shape as x."""
        scale, shift = self.modulation(cond).chunk(2, dim=-1)
        shape = (cond.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return self.norm(x) * (1 + scale.reshape(shape)) + shift.reshape(shape)


class Mlp(nn.Module):
    """Linear → GELU → Linear with ``ratio``× hidden channels."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) → (..., C)."""
        return self.fc2(F.gelu(self.fc1(x)))


class PatchEmbedding(nn.Module):
    """Conv3d (kernel = stride = patch) over upper air, Conv2d over surface; surface → pressure token 0.

    Upper input (B, C_u, Z, H, W) with levels in ascending hPa and surface input (B, C_s, H, W), where
    the channels stack the input times (and constants on the surface) → tokens
    (B, ⌈Z/pz⌉+1, ⌈H/ph⌉, W/pw, dim). With ``ground_up`` the levels are flipped first (Pangu's order,
    1000 → 50 hPa), so token 1 holds the lowest levels, beside the surface token; the level padding
    then goes to the top.
    """

    def __init__(self, upper_channels: int, surface_channels: int, dim: int, patch: tuple[int, int, int], ground_up: bool = True) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.ground_up = ground_up
        self.upper = nn.Conv3d(upper_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.surface = nn.Conv2d(surface_channels, dim, kernel_size=self.patch[1:], stride=self.patch[1:])

    def forward(self, upper: Tensor, surface: Tensor) -> Tensor:
        pz, ph, _ = self.patch
        if self.ground_up:
            upper = upper.flip(-3)
        nlat = ceil_to(upper.shape[-2], ph)
        upper = pad_end(upper, {-3: ceil_to(upper.shape[-3], pz), -2: nlat})
        surface = pad_end(surface, {-2: nlat})
        tokens = torch.cat([self.surface(surface)[:, :, None], self.upper(upper)], dim=2)
        return tokens.permute(0, 2, 3, 4, 1)


class PatchRecovery(nn.Module):
    """Transposed convolutions back to grid points, cropping the end padding of levels and latitude.

    Tokens (B, Zt, Ht, Wt, dim) → upper (B, V_u, Z, H, W) with levels in ascending hPa (flipped back
    from Pangu's order with ``ground_up``, as in :class:`PatchEmbedding`), surface (B, V_s, H, W).
    """

    def __init__(
        self, dim: int, n_upper: int, n_surface: int, patch: tuple[int, int, int], shape: tuple[int, int], ground_up: bool = True
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)  # (levels, latitudes) to crop to
        self.ground_up = ground_up
        self.upper = nn.ConvTranspose3d(dim, n_upper, kernel_size=tuple(patch), stride=tuple(patch))
        self.surface = nn.ConvTranspose2d(dim, n_surface, kernel_size=tuple(patch[1:]), stride=tuple(patch[1:]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        nz, nh = self.shape
        x = x.permute(0, 4, 1, 2, 3)
        surface = self.surface(x[:, :, 0])[:, :, :nh]
        upper = self.upper(x[:, :, 1:])[:, :, :nz, :nh]
        return (upper.flip(-3) if self.ground_up else upper), surface


class PatchMerging(nn.Module):
    """Merge 2×2 latitude/longitude tokens: (B, Z, H, W, C) → (B, Z, ⌈H/2⌉, W/2, 2C); LN, then linear 4C→2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, z, h, w, c = x.shape
        x = pad_end(x, {-3: ceil_to(h, 2)})
        x = x.reshape(b, z, -1, 2, w // 2, 2, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, z, -1, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class PatchUpsample(nn.Module):
    """Inverse of merging: linear 2C→4C, 2×2 pixel shuffle, crop latitude to ``nlat`` tokens, LN, linear C→C."""

    def __init__(self, dim: int, nlat: int) -> None:
        super().__init__()
        self.nlat = nlat
        self.expand = Linear(2 * dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.linear = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Z, H2, W2, 2C) → (B, Z, nlat, 2·W2, C)."""
        b, z, h, w, _ = x.shape
        x = self.expand(x)
        c = x.shape[-1] // 4
        x = x.reshape(b, z, h, w, 2, 2, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, z, 2 * h, 2 * w, c)
        return self.linear(self.norm(x[:, :, : self.nlat]))
