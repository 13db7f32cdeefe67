"""bdlens.data.WeatherDataset / DataConfig: sample times, contents, splits and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from synthetic import synthetic_dataset, write_synthetic

from bdlens.data import FieldLayout, WeatherDataset, compute_stats, load_data_config, make_datasets, open_dataset, stack_times
from bdlens.errors import BdlensError

H = np.timedelta64(1, "h")
START = np.datetime64("2000-01-01T00", "ns")


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return synthetic_dataset(times=24, levels=(500, 850))  # 6 days, 6-hourly


@pytest.fixture(scope="module")
def layout(ds) -> FieldLayout:
    return FieldLayout.from_dataset(ds)


@pytest.fixture(scope="module")
def stats(ds):
    return compute_stats(ds)


@pytest.mark.parametrize(("step", "input_steps"), [("6h", 2), ("24h", 2), ("6h", 1), ("12h", 3)])
def test_sample_times_are_t_minus_delta_t_t_plus_delta(ds, layout, step, input_steps):
    data = WeatherDataset(ds, layout, step, input_steps=input_steps)
    delta = int(step.rstrip("h")) * H
    # anchors t: every 6-hourly time with (input_steps − 1)·Δ before it and Δ after it
    expected_anchors = ds["time"].values[(input_steps - 1) * delta // (6 * H) : -(delta // (6 * H))]
    np.testing.assert_array_equal(data.times, expected_anchors)
    assert len(data) == expected_anchors.size
    for i in (0, len(data) - 1):
        t = data.times[i]
        wanted = [t + k * delta for k in range(-(input_steps - 1), 2)]
        np.testing.assert_array_equal(data.sample_times(i), np.array(wanted, "datetime64[ns]"))
        inputs, target = data[i]
        assert len(inputs) == input_steps
        for state, time in zip((*inputs, target), wanted):
            np.testing.assert_array_equal(state.upper[1, 0].numpy(), ds["temperature"].sel(time=time, level=500).values)
            np.testing.assert_array_equal(state.surface[0].numpy(), ds["2m_temperature"].sel(time=time).values)


def test_samples_are_normalised_and_memory_matches_lazy(ds, layout, stats):
    lazy = WeatherDataset(ds.chunk({"time": 5}), layout, "24h", stats=stats)
    memory = WeatherDataset(ds, layout, "24h", stats=stats, in_memory=True)
    assert len(lazy) == len(memory)
    (x0, x1), y = memory[3]
    t = memory.sample_times(3)[2]
    mean, std = stats.mean["geopotential"][1], stats.std["geopotential"][1]
    expected = (ds["geopotential"].sel(time=t, level=850).values.astype(np.float64) - mean) / std
    np.testing.assert_allclose(y.upper[0, 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    for i in range(len(memory)):
        (a0, a1), ay = lazy[i]
        (b0, b1), by = memory[i]
        for a, b in ((a0, b0), (a1, b1), (ay, by)):
            torch.testing.assert_close(a.upper, b.upper, rtol=0, atol=0)
            torch.testing.assert_close(a.surface, b.surface, rtol=0, atol=0)


def test_split_range_bounds_every_time_of_a_sample(ds, layout):
    lo, hi = np.datetime64("2000-01-02T00", "ns"), np.datetime64("2000-01-04T18", "ns")
    data = WeatherDataset(ds, layout, "24h", time_range=(lo, hi))
    all_times = np.stack([data.sample_times(i) for i in range(len(data))])
    assert all_times.min() == lo and all_times.max() == hi
    assert data.times[0] == lo + 24 * H and data.times[-1] == hi - 24 * H


def test_dataloader_batches(ds, layout, stats):
    data = WeatherDataset(ds, layout, "6h", stats=stats, in_memory=True)
    (x0, x1), y = next(iter(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert x0.upper.shape == (4, 2, 2, 32, 64) and x1.surface.shape == (4, 2, 32, 64) and y.upper.shape == (4, 2, 2, 32, 64)
    model_input = stack_times((x0, x1))  # (B, T_in, V, Z, H, W), oldest first
    assert model_input.upper.shape == (4, 2, 2, 2, 32, 64) and model_input.surface.shape == (4, 2, 2, 32, 64)
    torch.testing.assert_close(model_input.upper[:, 0], x0.upper, rtol=0, atol=0)
    torch.testing.assert_close(model_input.surface[:, 1], x1.surface, rtol=0, atol=0)


def test_step_that_the_time_step_does_not_divide(ds, layout):
    for step in ("9h", "3h"):
        with pytest.raises(BdlensError, match=rf"time step 6h does not divide Δ={step}; choose Δ as a multiple of 6h"):
            WeatherDataset(ds, layout, step)


def test_missing_times_are_named_or_skipped(ds, layout):
    holes = ds.drop_sel(time=[START + 30 * H, START + 72 * H])
    with pytest.raises(BdlensError, match=r"2 time\(s\) missing: 2000-01-02T06:00, 2000-01-04T00:00; fill the gaps"):
        WeatherDataset(holes, layout, "6h")
    data = WeatherDataset(holes, layout, "6h", allow_gaps=True)
    used = np.concatenate([data.sample_times(i) for i in range(len(data))])
    assert not np.isin([START + 30 * H, START + 72 * H], used).any()
    assert len(data) == 22 - 6  # each missing time removes the 3 samples that would use it


def test_nan_in_a_requested_field(ds, layout):
    bad = ds.copy(deep=True)
    bad["2m_temperature"][5, 2, 2] = np.nan
    for in_memory in (False, True):
        with pytest.raises(BdlensError, match=r"variable 2m_temperature has NaN/inf values at 2000-01-02T06:00"):
            WeatherDataset(bad, layout, "6h", in_memory=in_memory)
    WeatherDataset(bad, layout, "6h", time_range=("2000-01-03", None))  # a split without the NaN is fine


def test_empty_or_too_short_split(ds, layout):
    with pytest.raises(BdlensError, match="no times in the range"):
        WeatherDataset(ds, layout, "6h", time_range=("2001-01-01", "2001-02-01"))
    with pytest.raises(BdlensError, match="no complete sample"):
        WeatherDataset(ds, layout, "24h", time_range=("2000-01-01", "2000-01-01T18"))


# ------------------------------------------------------------------------------------------ config


def test_demo_config_matches_the_demo_world():
    cfg = load_data_config("configs/data_demo.yaml")
    assert cfg.levels == [100, 250, 400, 500, 600, 700, 850, 925]
    assert cfg.step_timedelta == 6 * H and cfg.input_steps == 2
    train, val, test = (cfg.splits[k].bounds for k in ("train", "val", "test"))
    six_hourly = np.arange(START, np.datetime64("2003-01-01", "ns"), 6 * H)
    in_range = [((six_hourly >= a) & (six_hourly <= b)).sum() for a, b in (train, val, test)]
    assert in_range == [731 * 4, 181 * 4, 184 * 4]  # whole days, 00–18 UTC inclusive, nothing shared


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("splits: {train: {start: 2000-01-01, end: 1999-01-01}}", r"splits\.train: end 1999-01-01 .* before start"),
        ("splits: {train: {start: '2000-01-3x', end: 2001-01-01}}", r"splits\.train\.start: '2000-01-3x' is not a date/time"),
        ("step: soon", r"step: 'soon' is not a time step"),
        ("step: -6h", r"step: step must be positive"),
        ("input_steps: 0", "input_steps: input_steps must be at least 1"),
        ("level: [500]", "level: Extra inputs are not permitted"),
        ("splits: {val: {start: 2000-01-01, end: 2000-02-01}}", "config: splits need a 'train' range"),
        (
            "splits: {train: {start: 2000-01-01, end: 2000-03-01}, val: {start: 2000-02-01, end: 2000-04-01}}",
            "config: splits train and val overlap",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    base = "upper_variables: [temperature]\nsurface_variables: []\nlevels: [500]\n"
    if not text.startswith("splits"):
        base += "splits: {train: {start: 2000-01-01, end: 2000-12-31}}\n"
    path = tmp_path / "c.yaml"
    path.write_text(base + text + "\n")
    with pytest.raises(BdlensError, match=rf"c\.yaml: invalid data config: {message}"):
        load_data_config(path)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(BdlensError, match="no such config file"):
        load_data_config(tmp_path / "none.yaml")
    for text in ("splits: [unclosed\n", "splits: {train: {start: 2000-13-01}}\n"):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(BdlensError, match=r"bad\.yaml: not valid YAML"):
            load_data_config(tmp_path / "bad.yaml")


def test_make_datasets_end_to_end(tmp_path):
    world = write_synthetic(tmp_path / "truth.zarr", times=40, levels=(250, 500, 850), constant_variables=("land_sea_mask",))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        f"path: {world}\nupper_variables: [temperature, geopotential]\nsurface_variables: [2m_temperature]\n"
        "levels: [850, 500]\nconstant_variables: [land_sea_mask]\nstep: 12h\n"
        "splits:\n  train: {start: 2000-01-01, end: 2000-01-06}\n  val: {start: 2000-01-07, end: 2000-01-10}\n"
    )
    sets = make_datasets(cfg, in_memory=True)
    assert set(sets) == {"train", "val"}
    assert (tmp_path / "truth.zarr.normstats.json").exists()
    train, val = sets["train"], sets["val"]
    assert train.layout.upper_variables == ("temperature", "geopotential") and train.layout.levels == (850, 500)
    assert len(train) == 6 * 4 - 4 and len(val) == 4 * 4 - 4
    assert train.constants.shape == (1, 32, 64)
    # the statistics come from the training period only, and every split uses them
    opened = open_dataset(world, variables=["temperature", "geopotential", "2m_temperature"], levels=[500, 850])
    expected = compute_stats(opened, ("2000-01-01", "2000-01-06T23"))
    everything = compute_stats(opened)
    assert train.stats is val.stats
    np.testing.assert_allclose(train.stats.mean["temperature"], expected.mean["temperature"], rtol=1e-12)
    assert not np.allclose(train.stats.std["temperature"], everything.std["temperature"], rtol=1e-6)
    (x0, x1), y = val[0]
    assert x0.upper.shape == (2, 2, 32, 64) and val.sample_times(0)[0] == np.datetime64("2000-01-07T00", "ns")


def test_layout_picks_its_levels_and_variables_from_a_larger_dataset(ds):
    layout = FieldLayout(("temperature",), (850,), ("2m_temperature",), grid=FieldLayout.from_dataset(ds).grid)
    data = WeatherDataset(ds, layout, "6h", input_steps=1)
    (x,), y = data[0]
    assert x.upper.shape == (1, 1, 32, 64) and x.surface.shape == (1, 32, 64)
    np.testing.assert_array_equal(y.upper[0, 0].numpy(), ds["temperature"].sel(time=data.sample_times(0)[1], level=850).values)
    with pytest.raises(BdlensError, match="lacks variable\\(s\\) specific_humidity"):
        WeatherDataset(ds, FieldLayout(("specific_humidity",), (850,), (), grid=layout.grid), "6h")
