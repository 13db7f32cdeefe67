"""3D window attention with the Earth-specific positional bias and the shifted-window mask (docs/science.md §3).

Windows are (wz, wh, ww) tokens in (pressure, latitude, longitude). After partitioning, a token
tensor becomes ``(B · nW, nTypes, N, C)``: longitude windows go into the batch axis (they share one
bias table and one mask), the (pressure window, latitude window) pairs are the window *types*
``t = pressure_window × n_lat_windows + lat_window``, and ``N = wz·wh·ww`` tokens inside a window are
ordered ``n = (z·wh + h)·ww + w``.

Hand-written because no library has the Earth-specific bias (absolute in pressure and latitude,
relative in longitude, one table per window type) nor a mask that leaves the longitude wrap open.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdlens.models.member_linear import Linear

MASK_VALUE = -100.0


def earth_position_index(window: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
    """Row of the Earth-specific bias table for every (query, key) pair of one window, shape (N, N).

    index = ((zi + wz·zj)·wh² + (hi + wh·hj))·(2ww−1) + (wi − wj + ww − 1), long integers in
    [0, wz²·wh²·(2ww−1)).
    """
    wz, wh, ww = window
    z, h, w = torch.meshgrid(
        torch.arange(wz, device=device), torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )
    z, h, w = z.reshape(-1), h.reshape(-1), w.reshape(-1)
    zi, zj = z[:, None], z[None, :]
    hi, hj = h[:, None], h[None, :]
    wi, wj = w[:, None], w[None, :]
    return ((zi + wz * zj) * wh**2 + (hi + wh * hj)) * (2 * ww - 1) + (wi - wj + ww - 1)


def bias_table_rows(window: tuple[int, int, int]) -> int:
    """Rows of one Earth-specific bias table: wz²·wh²·(2ww−1)."""
    wz, wh, ww = window
    return wz**2 * wh**2 * (2 * ww - 1)


def shift_regions(
    padded: tuple[int, int], window: tuple[int, int, int], sign: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Region label 0..8 of every rolled (pressure, latitude) token of a shifted block, shape (Zp, Hp).

    ``padded`` is the (pressure, latitude) token count after padding to whole windows. The input was
    rolled there by ``sign``·(wz//2, wh//2): with Pangu's +half window (``sign`` = 1) the *first*
    window of each axis holds tokens from both ends (its head wrapped around from the end), with the
    legacy −half window (``sign`` = −1) the *last* one does (its tail wrapped around from the start).
    Each axis splits into 3 parts (the wrapped part, the rest of that window, the untouched windows)
    and the plane into 3×3 regions.
    """
    labels = []
    for size, win in zip(padded, window[:2], strict=True):
        position = torch.arange(size, device=device)
        if sign > 0:
            labels.append((position >= win // 2).long() + (position >= win).long())
        else:
            labels.append((position >= size - win).long() + (position >= size - win // 2).long())
    return labels[0][:, None] * 3 + labels[1][None, :]


def shift_mask(
    padded: tuple[int, int], window: tuple[int, int, int], sign: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Additive mask of a shifted block (rolled by ``sign``·half a window), shape (nTypes, N, N): 0 for
    allowed pairs, −100 for pairs from different :func:`shift_regions`.

    Longitude does not enter: tokens rolled across the dateline are true neighbours, so the mask is
    the same for every longitude window (they share the batch axis).
    """
    (zp, hp), (wz, wh, ww) = padded, window
    region = shift_regions(padded, window, sign, device)
    region = region.reshape(zp // wz, wz, hp // wh, wh).permute(0, 2, 1, 3).reshape(-1, wz * wh)
    region = region[:, :, None].expand(-1, -1, ww).reshape(region.shape[0], -1)  # (nTypes, N)
    different = region[:, :, None] != region[:, None, :]
    return torch.where(different, MASK_VALUE, 0.0)


def window_partition(x: Tensor, window: tuple[int, int, int]) -> Tensor:
    """(B, Z, H, W, C) with Z, H, W multiples of the window → (B·nW, nTypes, N, C)."""
    b, z, h, w, c = x.shape
    wz, wh, ww = window
    x = x.reshape(b, z // wz, wz, h // wh, wh, w // ww, ww, c)
    x = x.permute(0, 5, 1, 3, 2, 4, 6, 7)
    return x.reshape(b * (w // ww), (z // wz) * (h // wh), wz * wh * ww, c)


def window_reverse(x: Tensor, window: tuple[int, int, int], shape: tuple[int, int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B·nW, nTypes, N, C) → (B, Z, H, W, C)."""
    wz, wh, ww = window
    z, h, w = shape
    c = x.shape[-1]
    x = x.reshape(-1, w // ww, z // wz, h // wh, wz, wh, ww, c)
    x = x.permute(0, 2, 4, 3, 5, 1, 6, 7)
    return x.reshape(-1, z, h, w, c)


class EarthAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows with one Earth-specific bias table.

    The bias (and, in shifted blocks, the mask) enter ``scaled_dot_product_attention`` as a float
    ``attn_mask`` so that PyTorch picks a memory-efficient kernel instead of materialising the
    softmax of every window by hand.
    """

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], n_types: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.window = tuple(window)
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.earth_bias = nn.Parameter(torch.empty(bias_table_rows(self.window), n_types, heads))
        nn.init.trunc_normal_(self.earth_bias, std=0.02)
        self.register_buffer("position_index", earth_position_index(self.window), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B·nW, nTypes, N, C) windows; mask: (nTypes, N, N) additive or None → same shape as x."""
        bw, n_types, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n_types, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, bw, n_types * self.heads, n, c // self.heads).unbind(0)
        bias = self.earth_bias[self.position_index].permute(2, 3, 0, 1)  # (nTypes, heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(-1, n, n).to(q.dtype))
        out = out.reshape(bw, n_types, self.heads, n, -1).transpose(2, 3).reshape(bw, n_types, n, c)
        return self.proj(out)
