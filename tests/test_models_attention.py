"""Earth-specific bias index, shift mask and window attention of the 3DEST against brute force."""

from __future__ import annotations

import itertools
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


def test_shift_regions_split_the_pressure_latitude_plane_in_nine():
    regions = shift_regions((6, 16), (2, 4, 8))
    assert regions.shape == (6, 16)
    assert len(regions.unique()) == 9
    # Only the last window of each axis is split, at its shifted half.
    assert (regions[:4, :12] == 0).all()
    assert regions[:, 12:14].unique(dim=1).shape[1] == 1 and not torch.equal(regions[:, 13], regions[:, 14])


@pytest.mark.parametrize("padded,window", [((6, 16), (2, 4, 8)), ((4, 12), (2, 6, 12)), ((2, 4), (2, 2, 3))])
def test_shift_mask_masks_exactly_pairs_wrapped_differently_in_pressure_or_latitude(padded, window):
    wz, wh, ww = window
    zp, hp = padded
    sz, sh = wz // 2, wh // 2
    mask = shift_mask(padded, window)
    n_lat_windows = hp // wh
    assert mask.shape == (zp // wz * n_lat_windows, wz * wh * ww, wz * wh * ww)
    tokens = _window_tokens(window)
    for t in range(mask.shape[0]):
        z0, h0 = (t // n_lat_windows) * wz, (t % n_lat_windows) * wh
        for (i, (zi, hi, _)), (j, (zj, hj, _)) in itertools.product(enumerate(tokens), repeat=2):
            # A rolled token at position p wrapped around iff it came from the start of the axis.
            wrapped_i = (z0 + zi >= zp - sz, h0 + hi >= hp - sh)
            wrapped_j = (z0 + zj >= zp - sz, h0 + hj >= hp - sh)
            assert mask[t, i, j] == (MASK_VALUE if wrapped_i != wrapped_j else 0.0)


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


@pytest.fixture()
def blocks():
    torch.manual_seed(0)
    window, shape = (2, 2, 4), (4, 4, 16)
    make = lambda shifted: EarthSpecificBlock(8, 2, window, shape, shifted, 2.0, 0.0).double().eval()  # noqa: E731
    return make(False), make(True), torch.randn(1, *shape, 8, dtype=torch.float64)


def test_shifted_window_joins_tokens_across_the_dateline_unmasked(blocks):
    plain, shifted, x = blocks
    # Rolled by −ww/2 = −2 in longitude, the last window holds longitudes 14, 15, 0, 1 (true neighbours).
    # Longitudes 14 → 1 also catches the typo of rolling longitude by the latitude shift (1).
    for source, target in (((0, 1, 15), (0, 1, 0)), ((1, 0, 14), (1, 0, 1))):
        assert _block_response(shifted, x, source, target) > 1e-6
        assert _block_response(plain, x, source, target) == 0.0


def test_shifted_window_masks_tokens_wrapped_in_latitude_and_pressure(blocks):
    _, shifted, x = blocks
    # Latitudes 3 and 0 share the last rolled latitude window but are 3 rows apart: masked.
    assert _block_response(shifted, x, (0, 3, 5), (0, 0, 5)) < 1e-12
    assert _block_response(shifted, x, (3, 0, 5), (0, 0, 5)) < 1e-12
    assert _block_response(shifted, x, (0, 2, 5), (0, 1, 5)) > 1e-6  # same window and region: attends


def test_shifted_block_treats_every_longitude_window_alike(blocks):
    _, shifted, x = blocks
    rolled = torch.roll(x, 4, dims=3)  # one whole longitude window
    torch.testing.assert_close(shifted(rolled), torch.roll(shifted(x), 4, dims=3))
