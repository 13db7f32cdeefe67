"""The demo world: layout, physical sanity, caching, analysis errors and the physics ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from bdlens.cli import main
from bdlens.data import open_dataset
from bdlens.errors import BdlensError
from bdlens.grid import GRIDS, lat_weights
from bdlens.world.build import build, read_manifest, resolve_config
from bdlens.world.config import load_world_config
from bdlens.world.ensemble import physics_ensemble
from bdlens.world.store import atomic_directory


def _weighted_rms(da: xr.DataArray) -> float:
    w = xr.DataArray(lat_weights(da.latitude.values), dims="latitude", coords={"latitude": da.latitude})
    return float(np.sqrt((da**2).weighted(w).mean()))


def test_world_layout_is_wb2(small_world: Path) -> None:
    truth = xr.open_zarr(small_world / "truth.zarr")
    np.testing.assert_allclose(truth.latitude.values, GRIDS["64x32"].latitudes(), atol=1e-9)
    assert truth.latitude.values[0] == pytest.approx(-87.1875) and truth.latitude.values[-1] == pytest.approx(87.1875)
    np.testing.assert_allclose(truth.longitude.values, np.arange(64) * 5.625)
    assert {500, 850} <= set(truth.level.values.tolist()) and truth.sizes["level"] >= 7
    for name in ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind"):
        assert truth[name].dims == ("time", "level", "latitude", "longitude")
    for name in ("mean_sea_level_pressure", "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"):
        assert truth[name].dims == ("time", "latitude", "longitude")
    assert truth.geopotential.attrs["units"] == "m2 s-2" and truth.level.attrs["units"] == "hPa"
    assert np.all(np.diff(truth.time.values) == np.timedelta64(6, "h"))
    assert str(truth.time.values[0]).startswith("2000-01-01T00")


def test_world_is_physically_sensible(small_world: Path) -> None:
    truth = xr.open_zarr(small_world / "truth.zarr")
    zonal_u = truth.u_component_of_wind.sel(level=250).mean(["time", "longitude"])
    for hemisphere in (zonal_u.latitude > 0, zonal_u.latitude < 0):
        jet = zonal_u.where(hemisphere, drop=True)
        assert 20.0 < float(jet.max()) < 45.0  # mid-latitude jets of 20-40 m/s
        assert 20.0 < abs(jet.latitude.values[int(np.argmax(jet.values))]) < 60.0
    t850 = truth.temperature.sel(level=850)
    assert 240.0 < float(t850.min()) and float(t850.max()) < 315.0
    # Hydrostatic: geopotential increases upwards; Z500 is near 5.5 km.
    z = truth.geopotential.mean(["time", "latitude", "longitude"]).compute()
    assert np.all(np.diff(z.values) < 0)  # levels ascend in hPa, so Z decreases
    assert 50_000 < float(z.values[list(truth.level.values).index(500)]) < 58_000
    mslp = float(truth.mean_sea_level_pressure.mean())
    assert 99_000 < mslp < 101_500


def test_analysis_error_has_documented_size_and_structure(small_world: Path) -> None:
    truth = xr.open_zarr(small_world / "truth.zarr")
    error = xr.open_zarr(small_world / "analysis.zarr") - truth
    cfg = resolve_config(None, small=True)
    wind = _weighted_rms(error.u_component_of_wind.sel(level=500)) ** 2 + _weighted_rms(error.v_component_of_wind.sel(level=500)) ** 2
    assert np.sqrt(wind / 2) == pytest.approx(cfg.analysis_error.wind_std_ms, rel=0.25)
    assert 0.2 < _weighted_rms(error.temperature.sel(level=850)) < 2.0
    assert 30.0 < _weighted_rms(error.geopotential.sel(level=500)) < 300.0
    # Spatially correlated: neighbouring longitudes are strongly correlated, unlike white noise.
    z = error.geopotential.sel(level=500).isel(time=slice(0, 8)).values
    corr = np.corrcoef(z.ravel(), np.roll(z, 1, axis=-1).ravel())[0, 1]
    assert corr > 0.8
    # Linear balance: mass errors are small at the equator where f = 0.
    equator = error.geopotential.sel(level=500).where(abs(error.latitude) < 6, drop=True)
    midlat = error.geopotential.sel(level=500).where(abs(error.latitude - 45) < 6, drop=True)
    assert float(np.sqrt((equator**2).mean())) < 0.3 * float(np.sqrt((midlat**2).mean()))


def test_second_build_reuses_cache_and_new_settings_do_not(small_world: Path) -> None:
    before = read_manifest(small_world)["built_at"]
    again = build(small=True, cache_dir=small_world.parent)
    assert again == small_world and read_manifest(again)["built_at"] == before
    cfg = resolve_config(None, small=True)
    assert cfg.model_copy(update={"seed": 1}).cache_key() != cfg.cache_key()
    assert cfg.model_copy(update={"days": 22}).cache_key() != cfg.cache_key()


def test_bad_world_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: [500, 850, 333]\nlayers: 4\n")
    with pytest.raises(BdlensError, match=r"levels.*333.*WB2|layers"):
        load_world_config(bad)
    with pytest.raises(BdlensError, match="does not exist"):
        load_world_config(tmp_path / "missing.yaml")
    with pytest.raises(BdlensError, match="not a built demo world"):
        read_manifest(tmp_path)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError):
        with atomic_directory(target, "forecast store") as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "precious").write_text("keep")
    with pytest.raises(BdlensError, match="already exists"):
        with atomic_directory(target, "forecast store"):
            pass
    with pytest.raises(BdlensError, match="not written by bdlens"):
        with atomic_directory(target, "forecast store", overwrite=True):
            pass
    assert (target / "precious").read_text() == "keep"


@pytest.fixture(scope="module")
def physics_run(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    out = tmp_path_factory.mktemp("ens") / "physics.zarr"
    physics_ensemble(small_world, ["2000-01-02T00", "2000-01-04T00"], members=6, lead_hours=120, out=out)
    return xr.open_zarr(out)


def test_physics_ensemble_layout(physics_run: xr.Dataset, small_world: Path) -> None:
    ds = physics_run
    assert ds.geopotential.dims == ("number", "time", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds.mean_sea_level_pressure.dims == ("number", "time", "prediction_timedelta", "latitude", "longitude")
    assert ds.sizes["number"] == 6 and ds.sizes["time"] == 2
    assert ds.prediction_timedelta.values[-1] == np.timedelta64(120, "h")
    truth = xr.open_zarr(small_world / "truth.zarr")
    for name in ("latitude", "longitude", "level"):  # bit for bit: plain xarray alignment with the truth works
        np.testing.assert_array_equal(ds[name].values, truth[name].values)
    xr.align(ds.geopotential.isel(number=0, time=0, prediction_timedelta=0), truth.geopotential.isel(time=0), join="exact")


def test_physics_ensemble_spread_starts_at_analysis_error_and_grows(physics_run: xr.Dataset, small_world: Path) -> None:
    z500 = physics_run.geopotential.sel(level=500)
    spread = np.sqrt(z500.var("number", ddof=1).mean(["time", "latitude", "longitude"]))
    truth = xr.open_zarr(small_world / "truth.zarr").geopotential.sel(level=500)
    analysis = xr.open_zarr(small_world / "analysis.zarr").geopotential.sel(level=500)
    analysis_rms = float(np.sqrt(((analysis - truth) ** 2).mean()))
    # Members = analysis + one more draw of the same error model: initial spread = analysis error.
    assert float(spread[0]) == pytest.approx(analysis_rms, rel=0.3)
    # Baroclinic error growth: after a first day of geostrophic adjustment (the error model is only
    # linearly balanced) the spread grows day after day.
    assert float(spread[-1]) > 1.8 * float(spread[0])
    assert np.all(np.diff(spread.values[4::4]) > 0)


def test_physics_member_does_not_depend_on_member_count(physics_run: xr.Dataset, small_world: Path, tmp_path: Path) -> None:
    out = physics_ensemble(small_world, ["2000-01-04T00"], members=2, lead_hours=120, out=tmp_path / "two.zarr")
    two = xr.open_zarr(out).temperature.sel(level=850)
    # One init: its time encodes as 0, the fill value; the chunk must be on disk all the same (the canonical reader checks).
    np.testing.assert_array_equal(open_dataset(out).time.values, np.array(["2000-01-04T00"], "datetime64[ns]"))
    six = physics_run.temperature.sel(level=850, time="2000-01-04T00")
    np.testing.assert_allclose(two.isel(time=0).values, six.isel(number=slice(0, 2)).values, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def batched_runs(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, xr.Dataset]:
    """Short runs keyed by (members, member_batch); one through the CLI to cover --member-batch."""
    root = tmp_path_factory.mktemp("batched")
    inits = ["2000-01-02T00", "2000-01-04T00"]
    runs = {}
    for members, batch in ((3, 1), (5, 2), (5, 3)):
        out = physics_ensemble(small_world, inits, members=members, lead_hours=12, out=root / f"m{members}b{batch}.zarr", member_batch=batch)
        runs[f"m{members}b{batch}"] = xr.open_zarr(out).load()
    args = ["-q", "world", "ensemble", "--world", str(small_world), "--out", str(root / "cli.zarr"), "--members", "3", "--lead-hours", "12"]
    assert main([*args, "--init", inits[0], "--init", inits[1], "--member-batch", "2"]) == 0
    runs["m3b2"] = xr.open_zarr(root / "cli.zarr").load()
    return runs


def _assert_float32_close(actual: xr.Dataset, expected: xr.Dataset) -> None:
    """Equal up to float32 round-off: measured ≤ 8.3e-6 of each field's largest magnitude (winds at
    12 h); a pointwise rtol alone cannot work for fields that cross zero."""
    for name in expected.data_vars:
        want = expected[name].values
        np.testing.assert_allclose(actual[name].values, want, rtol=1e-5, atol=2e-5 * float(np.abs(want).max()), err_msg=name)


def test_physics_batched_equals_serial(batched_runs: dict[str, xr.Dataset]) -> None:
    serial = batched_runs["m3b1"]
    for key in ("m3b2", "m5b2", "m5b3"):
        _assert_float32_close(batched_runs[key].isel(number=slice(0, 3)), serial)
    # Batching is not a no-op: vmapped XLA kernels round differently in the last bits.
    assert not np.array_equal(batched_runs["m3b2"].geopotential.values, serial.geopotential.values)


def test_physics_member_does_not_depend_on_batching(batched_runs: dict[str, xr.Dataset]) -> None:
    # Same batch shape (the last partial batch is padded): the member count changes nothing at all.
    xr.testing.assert_identical(batched_runs["m5b2"].isel(number=slice(0, 3)), batched_runs["m3b2"])
    _assert_float32_close(batched_runs["m5b3"], batched_runs["m5b2"])
    # Members really differ from each other, so the comparisons above are member by member.
    z = batched_runs["m5b2"].geopotential.isel(prediction_timedelta=0).values
    assert np.abs(z[1] - z[0]).max() > 10.0


def test_physics_batched_output_layout(batched_runs: dict[str, xr.Dataset], physics_run: xr.Dataset, small_world: Path) -> None:
    ds = batched_runs["m5b3"]
    truth = xr.open_zarr(small_world / "truth.zarr")
    assert ds.geopotential.dims == physics_run.geopotential.dims
    assert ds.mean_sea_level_pressure.dims == physics_run.mean_sea_level_pressure.dims
    assert set(ds.data_vars) == set(physics_run.data_vars) and ds.attrs == physics_run.attrs
    np.testing.assert_array_equal(ds.number.values, np.arange(5))
    np.testing.assert_array_equal(ds.time.values, np.array(["2000-01-02T00", "2000-01-04T00"], dtype="datetime64[ns]"))
    np.testing.assert_array_equal(ds.prediction_timedelta.values, np.array([0, 6, 12], dtype="timedelta64[h]").astype("timedelta64[ns]"))
    for name in ("level", "latitude", "longitude"):
        np.testing.assert_array_equal(ds[name].values, truth[name].values)
    assert ds.geopotential.dtype == np.float32 and np.isfinite(ds.geopotential.values).all()
    # Lead 0 of the ensemble mean is the analysis plus a mean of perturbations: close to the analysis.
    analysis = xr.open_zarr(small_world / "analysis.zarr").temperature.sel(level=850, time=ds.time)
    assert float(np.abs(ds.temperature.sel(level=850).isel(prediction_timedelta=0).mean("number") - analysis).mean()) < 1.0


def test_cli_world_ensemble_rejects_bad_input(small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["world", "ensemble", "--world", str(small_world), "--init", "2000-01-02T03", "--out", str(tmp_path / "x.zarr")])
    assert code == 2 and "not a restart time" in capsys.readouterr().err
    code = main(["world", "ensemble", "--world", str(small_world), "--init", "2000-01-02T00", "--members", "1", "--out", str(tmp_path / "x.zarr")])
    assert code == 2 and "at least 2" in capsys.readouterr().err
    code = main(["world", "ensemble", "--world", str(small_world), "--init", "2000-01-02T00", "--member-batch", "0", "--out", str(tmp_path / "x.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "--member-batch must be at least 1 (got 0)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()
    code = main(["world", "summary", str(tmp_path)])
    assert code == 2 and "not a built demo world" in capsys.readouterr().err


def test_manifest_records_what_the_realization_depends_on(small_world: Path) -> None:
    """Config and seed fix a world on one machine only: the manifest names the core's software and CPU."""
    import importlib.metadata

    software = read_manifest(small_world)["software"]
    assert {k: software[k] for k in ("dinosaur", "jax", "jaxlib")} == {k: importlib.metadata.version(k) for k in ("dinosaur", "jax", "jaxlib")}
    assert software["machine"] and software["cpu"]


def test_cli_world_build_small_prints_summary(small_world: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-q", "world", "build", "--small", "--cache-dir", str(small_world.parent)]) == 0
    out = capsys.readouterr().out
    assert str(small_world) in out
    summary = json.loads(out[out.index("{") :])
    assert summary["grid"] == "64x32" and summary["n_times"] == 84
