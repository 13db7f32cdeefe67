"""Earth-specific bias index, shift mask and window attention of the 3DEST against brute force."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from bdlens.models.attention import (
    MASK_VALUE,
    bias_table_rows,
    earth_position_index,
    shift_mask,
    shift_regions,
    window_partition,
    window_reverse,
)
from bdlens.models.transformer import EarthSpecificBlock


def _window_tokens(window):
    return list(itertools.product(*(range(w) for w in window)))  # ordered n = (z·wh + h)·ww + w


@pytest.mark.parametrize("window", [(2, 6, 12), (2, 4, 8), (1, 3, 2)])
def test_bias_index_matches_formula_and_covers_every_row_once_per_pattern(window):
    wz, wh, ww = window
    index = earth_position_index(window)
    tokens = _window_tokens(window)
    assert index.shape == (len(tokens), len(tokens))
    pattern_of_row = {}
    rows_used = Counter()
    for (i, (zi, hi, wi)), (j, (zj, hj, wj)) in itertools.product(enumerate(tokens), repeat=2):
        expected = ((zi + wz * zj) * wh**2 + (hi + wh * hj)) * (2 * ww - 1) + (wi - wj + ww - 1)
        assert index[i, j] == expected
        # Absolute in pressure and latitude, relative in longitude: one row per such pattern.
        pattern = (zi, zj, hi, hj, wi - wj)
        assert pattern_of_row.setdefault(int(index[i, j]), pattern) == pattern
        rows_used[int(index[i, j])] += 1
    assert sorted(pattern_of_row) == list(range(bias_table_rows(window)))
    # A row with longitude offset d is shared by exactly the ww − |d| pairs with that offset.
    for row, (_, _, _, _, d) in pattern_of_row.items():
        assert rows_used[row] == ww - abs(d)


@pytest.mark.parametrize("sign", [1, -1])
def test_shift_regions_split_the_pressure_latitude_plane_in_nine(sign):
    regions = shift_regions((6, 16), (2, 4, 8), sign)
    assert regions.shape == (6, 16)
    assert len(regions.unique()) == 9
    # Only the window that holds both ends of each axis is split, at its half: the first one when rolled
    # by +half a window (Pangu; its head came round from the end), the last one when rolled by −half a
    # window (legacy; its tail came round from the start).
    if sign > 0:
        z, h = [0, 1, 2, 2, 2, 2], [0, 0, 1, 1] + [2] * 12
    else:
        z, h = [0, 0, 0, 0, 1, 2], [0] * 12 + [1, 1, 2, 2]
    assert torch.equal(regions, torch.tensor(z)[:, None] * 3 + torch.tensor(h)[None, :])


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("padded,window", [((6, 16), (2, 4, 8)), ((4, 12), (2, 6, 12)), ((2, 4), (2, 2, 3))])
def test_shift_mask_masks_exactly_pairs_wrapped_differently_in_pressure_or_latitude(padded, window, sign):
    wz, wh, ww = window
    zp, hp = padded
    sz, sh = wz // 2, wh // 2
    mask = shift_mask(padded, window, sign)
    n_lat_windows = hp // wh
    assert mask.shape == (zp // wz * n_lat_windows, wz * wh * ww, wz * wh * ww)
    tokens = _window_tokens(window)

    def wrapped(z: int, h: int) -> tuple[bool, bool]:
        # Rolled by +s, positions p < s came round from the end; rolled by −s, positions p ≥ size − s from the start.
        if sign > 0:
            return z < sz, h < sh
        return z >= zp - sz, h >= hp - sh

    for t in range(mask.shape[0]):
        z0, h0 = (t // n_lat_windows) * wz, (t % n_lat_windows) * wh
        for (i, (zi, hi, _)), (j, (zj, hj, _)) in itertools.product(enumerate(tokens), repeat=2):
            assert mask[t, i, j] == (MASK_VALUE if wrapped(z0 + zi, h0 + hi) != wrapped(z0 + zj, h0 + hj) else 0.0)


def test_window_partition_round_trip_and_type_order():
    x = torch.randn(2, 4, 6, 8, 3)
    windows = window_partition(x, (2, 3, 4))
    assert windows.shape == (2 * 2, 2 * 2, 24, 3)
    # batch index b·nW + longitude window; type = pressure window × n_lat_windows + lat window.
    torch.testing.assert_close(windows[1 * 2 + 1, 1 * 2 + 0, 0], x[1, 2, 0, 4])
    torch.testing.assert_close(window_reverse(windows, (2, 3, 4), (4, 6, 8)), x)


def _block_response(block, x, source, target):
    """Change of the block output at token ``target`` when the input at token ``source`` changes."""
    bumped = x.clone()
    bumped[(0, *source)] += 1.0
    return (block(bumped)[(0, *target)] - block(x)[(0, *target)]).abs().max().item()


@pytest.fixture(params=[1, -1], ids=["pangu", "legacy"])
def blocks(request):
    torch.manual_seed(0)
    window, shape = (2, 2, 4), (4, 4, 16)
    make = lambda shifted: EarthSpecificBlock(8, 2, window, shape, shifted, 2.0, 0.0, request.param).double().eval()  # noqa: E731
    return make(False), make(True), torch.randn(1, *shape, 8, dtype=torch.float64)


def test_shifted_window_joins_tokens_across_the_dateline_unmasked(blocks):
    plain, shifted, x = blocks
    # Rolled by ±ww/2 = ±2 in longitude, one window holds longitudes 14, 15, 0, 1 (true neighbours).
    # Longitudes 14 → 1 also catches the typo of rolling longitude by the latitude shift (1).
    for source, target in (((0, 1, 15), (0, 1, 0)), ((1, 0, 14), (1, 0, 1))):
        assert _block_response(shifted, x, source, target) > 1e-6
        assert _block_response(plain, x, source, target) == 0.0


def test_shifted_window_masks_tokens_wrapped_in_latitude_and_pressure(blocks):
    _, shifted, x = blocks
    # Latitudes 3 and 0 share a rolled latitude window but are 3 rows apart: masked.
    assert _block_response(shifted, x, (0, 3, 5), (0, 0, 5)) < 1e-12
    assert _block_response(shifted, x, (3, 0, 5), (0, 0, 5)) < 1e-12
    assert _block_response(shifted, x, (0, 2, 5), (0, 1, 5)) > 1e-6  # same window and region: attends


def test_shifted_block_treats_every_longitude_window_alike(blocks):
    _, shifted, x = blocks
    rolled = torch.roll(x, 4, dims=3)  # one whole longitude window
    torch.testing.assert_close(shifted(rolled), torch.roll(shifted(x), 4, dims=3))


def _paper_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """Pangu-Weather's pseudocode ``construct_position_index``, transcribed step by step: (N, N) rows
    of the bias table for (query i, key j)."""
    wz, wh, ww = window
    coords_zi, coords_zj = torch.arange(wz), -torch.arange(wz) * wz
    coords_hi, coords_hj = torch.arange(wh), -torch.arange(wh) * wh
    coords_w = torch.arange(ww)
    coords_1 = torch.stack(torch.meshgrid(coords_zi, coords_hi, coords_w, indexing="ij")).flatten(1)
    coords_2 = torch.stack(torch.meshgrid(coords_zj, coords_hj, coords_w, indexing="ij")).flatten(1)
    coords = (coords_1[:, :, None] - coords_2[:, None, :]).permute(1, 2, 0).clone()
    coords[:, :, 2] += ww - 1
    coords[:, :, 1] *= 2 * ww - 1
    coords[:, :, 0] *= (2 * ww - 1) * wh * wh
    return coords.sum(-1)


def _reference_block(block: EarthSpecificBlock, x: torch.Tensor, sign: int) -> torch.Tensor:
    """One Earth-specific block by brute force: explicit roll by sign·half a window, a loop over windows,
    plain softmax(q·kᵀ/√d + bias[index(query, key), window type, head] + mask) per head, where the
    mask separates tokens of a rolled window that came round from opposite ends of the pressure or
    latitude axis (never longitude), roll back, crop, then the res-post-norm residuals."""
    (wz, wh, ww), (z, h, w) = block.window, block.shape
    zp, hp = -(-z // wz) * wz, -(-h // wh) * wh
    heads, c = block.attn.heads, x.shape[-1]
    d = c // heads
    shifted = any(block.shift)
    s = [sign * (n // 2) if shifted else 0 for n in (wz, wh, ww)]
    padded = torch.zeros(x.shape[0], zp, hp, w, c, dtype=x.dtype)
    padded[:, :z, :h] = x
    # rolled[p] = padded[p − s] on every axis (torch.roll's convention, written out)
    iz, ih, iw = ((torch.arange(n) - si) % n for n, si in zip((zp, hp, w), s, strict=True))
    rolled = padded[:, iz][:, :, ih][:, :, :, iw]

    def came_round(p: int, size: int, half: int) -> bool:
        return p < half if sign > 0 else p >= size - half

    table = block.attn.earth_bias.detach().double()
    index = _paper_position_index(block.window)
    qkv_w, qkv_b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
    out = torch.zeros_like(rolled)
    n_lat_windows = hp // wh
    for zw, hw, lw in itertools.product(range(zp // wz), range(hp // wh), range(w // ww)):
        t = zw * n_lat_windows + hw
        pos = [(zw * wz + a, hw * wh + b, lw * ww + e) for a, b, e in _window_tokens(block.window)]
        tokens = torch.stack([rolled[:, pz, ph, pl] for pz, ph, pl in pos], dim=1)  # (B, N, C)
        q, k, v = (tokens @ qkv_w.T + qkv_b).chunk(3, dim=-1)
        heads_out = []
        for head in range(heads):
            qh, kh, vh = (m[..., head * d : (head + 1) * d] for m in (q, k, v))
            logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
            for i, j in itertools.product(range(len(pos)), repeat=2):
                logits[:, i, j] += table[index[i, j], t, head]
                (zi, hi, _), (zj, hj, _) = pos[i], pos[j]
                apart = (came_round(zi, zp, wz // 2), came_round(hi, hp, wh // 2)) != (came_round(zj, zp, wz // 2), came_round(hj, hp, wh // 2))
                if shifted and apart:
                    logits[:, i, j] += MASK_VALUE
            heads_out.append(torch.softmax(logits, dim=-1) @ vh)
        attended = torch.cat(heads_out, dim=-1) @ block.attn.proj.weight.double().T + block.attn.proj.bias.double()
        for n, (pz, ph, pl) in enumerate(pos):
            out[:, pz, ph, pl] = attended[:, n]
    back = out[:, (torch.arange(zp) + s[0]) % zp][:, :, (torch.arange(hp) + s[1]) % hp][:, :, :, (torch.arange(w) + s[2]) % w]
    x = x + block.norm1(back[:, :z, :h])
    return x + block.norm2(block.mlp(x))


@pytest.mark.parametrize("sign", [1, -1], ids=["pangu", "legacy"])
@pytest.mark.parametrize("shifted", [False, True])
def test_block_equals_a_plain_softmax_reference_with_the_paper_bias_index(shifted, sign):
    """Shapes with padding in pressure and latitude, several window types and longitude windows; the
    bias table is random and far from symmetric, so swapping the query and key roles shows."""
    torch.manual_seed(7)
    window, shape = (2, 2, 4), (3, 5, 8)
    block = EarthSpecificBlock(8, 2, window, shape, shifted, 2.0, 0.0, sign).double().eval()
    with torch.no_grad():
        block.attn.earth_bias.normal_(0.0, 1.0)
    assert torch.equal(block.attn.position_index, _paper_position_index(window))
    x = torch.randn(2, *shape, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference_block(block, x, sign), rtol=1e-10, atol=1e-10)


def test_the_two_shift_signs_differ_only_by_a_relabelling_of_window_types():
    """With even windows, rolling by +half a window (Pangu) or −half a window (legacy) cuts the same
    windows: Pangu's window i along an axis is the legacy window i − 1. A legacy block's bias table with
    its window types relabelled that way gives a Pangu block the same output (docs/science.md §3)."""
    torch.manual_seed(8)
    window, shape = (2, 2, 4), (4, 6, 8)
    legacy = EarthSpecificBlock(8, 2, window, shape, True, 2.0, 0.0, -1).double().eval()
    pangu = EarthSpecificBlock(8, 2, window, shape, True, 2.0, 0.0, 1).double().eval()
    n_z, n_h = pangu.padded[0] // window[0], pangu.padded[1] // window[1]
    relabel = [((t // n_h - 1) % n_z) * n_h + (t % n_h - 1) % n_h for t in range(n_z * n_h)]
    pangu.load_state_dict(legacy.state_dict())
    with torch.no_grad():
        legacy.attn.earth_bias.normal_(0.0, 1.0)
        pangu.attn.earth_bias.copy_(legacy.attn.earth_bias[:, relabel])
        x = torch.randn(1, *shape, 8, dtype=torch.float64)
        torch.testing.assert_close(pangu(x), legacy(x), rtol=1e-12, atol=1e-12)
        pangu.attn.earth_bias.copy_(legacy.attn.earth_bias)  # without the relabelling they differ
        assert not torch.allclose(pangu(x), legacy(x))
