"""The ensemble engine: reproducibility, batch/member/process independence, resume, overwrite safety,
the stored decomposition, perturbation at every lead, and bad input (bundled models, small world)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from bdlens.cli import main
from bdlens.ensemble import Forecaster
from bdlens.ensemble import engine as engine_module
from bdlens.errors import BdlensError
from bdlens.uncertainty import decompose

INIT = "2000-01-10T00"


@pytest.fixture(scope="module")
def analysis(small_world: Path) -> xr.Dataset:
    return xr.open_zarr(small_world / "analysis.zarr").load()


@pytest.fixture(scope="module")
def forecaster() -> Forecaster:
    return Forecaster.from_pretrained(device="cpu")


def run(forecaster: Forecaster, analysis: xr.Dataset, out: Path | None = None, **kw) -> xr.Dataset:
    options = dict(init=[INIT], members=4, weights=2, lead="48h", output_step="24h", perturbation="sppt", seed=3, data=analysis)
    return forecaster.ensemble(out=out, **(options | kw))


def values(ds: xr.Dataset) -> np.ndarray:
    return np.concatenate([ds[v].values.ravel() for v in sorted(ds.data_vars)])


def test_seed_reproducibility_and_batch_and_member_independence(forecaster, analysis):
    base = run(forecaster, analysis, batch_size=4)
    again = run(forecaster, analysis, batch_size=2)  # another batch size: member values unchanged
    np.testing.assert_array_equal(values(base), values(again))
    other_seed = run(forecaster, analysis, seed=4)
    assert not np.allclose(values(base), values(other_seed))
    # Members 0..3 of an 8-member run with the same J = 2 are weight samples 0, 1: the same members.
    bigger = run(forecaster, analysis, members=8, weights=4)
    np.testing.assert_array_equal(values(bigger.isel(number=slice(0, 4))), values(base))
    np.testing.assert_array_equal(bigger.weight_sample.values, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(bigger.perturbation_draw.values, [0, 1, 0, 1, 0, 1, 0, 1])


def test_every_lead_of_a_perturbed_run_is_perturbed(forecaster, analysis):
    # Deterministic weights, so any spread comes from SPPT; leads of 24 h steps only (24, 48 h).
    for scheme in ("sppt", "ic", "bred"):
        ds = run(forecaster, analysis, bayes=False, weights=None, perturbation=scheme)
        spread = ds.geopotential.sel(level=500).std("number")
        assert (spread.mean(("latitude", "longitude")) > 1.0).all(), scheme
    none = run(forecaster, analysis, bayes=False, weights=None, perturbation="none")
    assert float(none.geopotential.std("number").max()) == 0.0


def test_per_lead_factors_scale_the_perturbation_of_the_call_ending_at_that_lead(forecaster, analysis):
    options = dict(bayes=False, weights=None, perturbation="sppt")
    plain, none = run(forecaster, analysis, **options), run(forecaster, analysis, bayes=False, weights=None, perturbation="none")
    first_off = run(forecaster, analysis, lead_factors={24: 0.0, 48: 1.0}, **options)
    second_off = run(forecaster, analysis, lead_factors={24: 1.0, 48: 0.0}, **options)
    day = {"prediction_timedelta": np.timedelta64(24, "h")}
    two = {"prediction_timedelta": np.timedelta64(48, "h")}
    np.testing.assert_array_equal(values(first_off.sel(day)), values(none.sel(day)))  # factor 0: the unperturbed step
    np.testing.assert_array_equal(values(second_off.sel(day)), values(plain.sel(day)))  # factor 1: the calibrated step
    assert not np.allclose(values(second_off.sel(two)), values(plain.sel(two)))
    assert first_off.attrs["config"] != plain.attrs["config"]  # the factors are part of the stored request
    amplitude = forecaster.system.scheme("sppt", bayes=False)["amplitude"]  # the deterministic weights' own calibration
    assert first_off.attrs["system"].endswith(f"+ sppt (amplitude {amplitude:.3g} × 0 … 1 to 48 h)")  # and the system says so
    none_given = run(forecaster, analysis, lead_factors={}, **options)
    assert none_given.attrs["system"].endswith(f"+ sppt (amplitude {amplitude:.3g})")


def _eddy_variances(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Brute force: each non-geopotential field's area-weighted variance about its zonal mean, (..., )
    per remaining dims (geopotential above the lowest level follows temperature hydrostatically).
    cos φ weights: on a grid without pole rows, the engine's cell-area weights up to a constant."""
    w = np.cos(np.deg2rad(ds.latitude.values))
    w = w / w.mean()
    out = {}
    for name in sorted(ds.data_vars):
        if name == "geopotential":
            continue
        x = ds[name].transpose(..., "latitude", "longitude").values.astype(np.float64)
        eddy = x - x.mean(axis=-1, keepdims=True)
        out[name] = (eddy**2 * w[:, None]).mean(axis=(-2, -1))
    return out


def test_sppt_members_are_no_more_active_than_their_analysis(forecaster, analysis):
    """No perturbed field's eddy variance exceeds that of the analysis the members started from, or
    the unperturbed step's where that is larger; and the limit is reached (it acts)."""
    options = dict(bayes=False, weights=None, lead="24h")
    sppt, none = run(forecaster, analysis, perturbation="sppt", **options), run(forecaster, analysis, perturbation="none", **options)
    start = _eddy_variances(analysis.sel(time=INIT)[list(sppt.data_vars)])
    perturbed, unperturbed = _eddy_variances(sppt.isel(prediction_timedelta=0, time=0)), _eddy_variances(none.isel(prediction_timedelta=0, time=0, number=0))
    at_limit = 0
    for name, cap in start.items():
        bound = np.maximum(cap, unperturbed[name])
        assert np.all(perturbed[name] <= bound * (1 + 1e-4)), name
        at_limit += int(np.sum(perturbed[name] > bound * (1 - 1e-3)))
    assert at_limit > 0


def test_negative_per_lead_factor_is_refused_before_any_output(forecaster, analysis, tmp_path):
    with pytest.raises(BdlensError, match="per-lead amplitude factors"):
        run(forecaster, analysis, out=tmp_path / "out.zarr", lead_factors={24: -1.0})
    assert not (tmp_path / "out.zarr").exists()


def test_per_lead_factor_is_linear_between_calibrated_leads_and_held_beyond():
    from bdlens.ensemble.schemes import SchemeContext

    context = SchemeContext(0, 2.0, None, {}, lead_factors={24: 1.0, 72: 0.5})
    assert [context.lead_factor(h) for h in (6, 24, 48, 72, 240)] == [1.0, 1.0, 0.75, 0.5, 0.5]
    assert SchemeContext(0, 2.0, None, {}).lead_factor(48) == 1.0


def test_learned_perturbation_uses_only_the_steps_it_can_perturb(forecaster, analysis):
    with pytest.raises(BdlensError, match="cannot be reached"):
        run(forecaster, analysis, perturbation="learned", lead="30h", output_step="10h")
    ds = run(forecaster, analysis, perturbation="learned", lead="12h", output_step="6h")
    assert "learned" in ds.attrs["system"]
    assert (ds.temperature.sel(level=850).std("number").mean(("latitude", "longitude")) > 0).all()


def test_persistence_reference_repeats_the_analysis(forecaster, analysis):
    ds = forecaster.ensemble(init=[INIT], members=1, lead="48h", model="persistence", data=analysis)
    start = analysis.sel(time=INIT)
    for lead in ds.prediction_timedelta.values:
        np.testing.assert_array_equal(ds.temperature.sel(prediction_timedelta=lead).isel(number=0, time=0).values, start.temperature.values)
    assert ds.attrs["network_evaluations_per_member_step"] == 0
    with pytest.raises(BdlensError, match="takes no --weights"):
        forecaster.ensemble(init=[INIT], members=2, weights=2, model="persistence", data=analysis)


def test_bred_vectors_are_grown_by_the_step_model_and_sized_like_the_ic_fields(forecaster, analysis):
    """The scheme's initial perturbation at the init is the bred vector of a breeding loop run here by
    hand with the 6 h model (control from the analyses 30 h and 24 h before), its normalised rms is
    amplitude × 0.05 for every member, and it grows faster over the next day than the IC scheme's
    random fields of the same size: the defining property of bred vectors."""
    from bdlens.ensemble import Design, Forecast
    from bdlens.ensemble.rollout import history_offsets, initial_states
    from bdlens.perturbation.initial import bred_vectors

    source, _ = forecaster.source(Design(3, 3), "bred", False, seed=5, amplitude=2.0)
    assert history_offsets(source) == [0, -6, -24, -30]
    model = source.inner.models[6]
    layout, stats, init = model.layout, model.stats, np.datetime64(INIT)
    history = initial_states(analysis, layout, np.array([init], dtype="datetime64[ns]"), history_offsets(source))
    key = int(init.astype("datetime64[h]").astype(int))

    def perturbed(members: tuple[int, ...], init_key: int = key) -> dict:
        source.start(Forecast(init_key, members))
        return source.initial({off: type(f)(*(x.expand(len(members), *x.shape[1:]) for x in f)) for off, f in history.items()})

    states = perturbed((0, 1, 2))
    assert sorted(states) == [-24, -6, 0]  # the breeding window is not passed on

    def step(prev, cur):  # the 6 h model in normalised units, written out independently of the scheme
        phys = [layout.denormalise(type(history[0])(*s), stats) for s in (prev, cur)]
        return tuple(layout.normalise(model.step(*phys), stats))

    control = [tuple(layout.normalise(history[off], stats)) for off in (-30, -24)]
    expected = bred_vectors(step, *control, amplitude=0.1, cycles=4, seed=5, members=(0, 1, 2), init=key)
    delta = layout.normalise(states[0], stats)
    base = layout.normalise(history[0], stats)
    got = (delta.upper - base.upper, delta.surface - base.surface)
    for g, e in zip(got, expected.cur, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), atol=2e-5, rtol=1e-4)
    rms = torch.sqrt((got[0].flatten(1).square().sum(1) + got[1].flatten(1).square().sum(1)) / (got[0][0].numel() + got[1][0].numel()))
    torch.testing.assert_close(rms, torch.full((3,), 0.1, dtype=rms.dtype), rtol=1e-3, atol=0)

    def growth(delta: tuple) -> float:
        """Normalised rms of the 24 h (4 × 6 h) difference that ``delta`` on the analyses makes."""
        pairs = [tuple(layout.normalise(history[off], stats)) for off in (-6, 0)]
        runs = [pairs, [tuple(x + d for x, d in zip(s, delta, strict=True)) for s in pairs]]
        for _ in range(4):
            runs = [[cur, step(prev, cur)] for prev, cur in runs]
        diff = [a - b for a, b in zip(runs[1][1], runs[0][1], strict=True)]
        return float(torch.sqrt(sum(d.square().sum() for d in diff) / sum(d.numel() for d in diff)))

    ic, _ = forecaster.source(Design(3, 3), "ic", False, seed=5, amplitude=2.0)
    ic.start(Forecast(key, (0, 1, 2)))
    random = layout.normalise(ic.initial({0: type(history[0])(*(x.expand(3, *x.shape[1:]) for x in history[0]))})[0], stats)
    random = [r - b for r, b in zip(random, base, strict=True)]
    size = torch.sqrt(sum(r.square().sum() for r in random) / sum(r.numel() for r in random))
    assert float(size) == pytest.approx(0.1, rel=0.15)  # both schemes perturb by amplitude × 0.05
    assert growth(got) > 1.15 * growth([r * (0.1 / size) for r in random])
    alone = perturbed((1, 2))
    torch.testing.assert_close(alone[0].upper, states[0].upper[1:], atol=0, rtol=0)  # keyed by member, not batch
    assert not torch.allclose(perturbed((2,), key + 24)[0].upper, alone[0].upper)  # another init, another vector
    with pytest.raises(BdlensError, match="30 h before"):  # data without the breeding window's start
        forecaster.ensemble(init=[INIT], members=2, lead="24h", perturbation="bred", bayes=False, data=analysis.drop_sel(time=init - np.timedelta64(30, "h")))
    bundled = forecaster.ensemble(members=2, lead="24h", perturbation="bred", bayes=False)  # the bundled analyses hold it
    assert float(bundled.geopotential.std("number").max()) > 0


def test_climatology_members_follow_past_trajectories_of_the_training_period(forecaster, analysis):
    """Member m at every lead is the data at τ_m + lead, one τ_m per member at the init's hour of day
    inside the training period; independent of the batch size; another seed picks other analogues."""
    ds = forecaster.ensemble(init=[INIT], members=6, lead="48h", model="climatology", data=analysis, batch_size=6, seed=1)
    times = analysis.time.values
    for m in range(6):
        member = ds.temperature.isel(number=m, time=0)
        matches = [t for t in times if np.array_equal(analysis.temperature.sel(time=t).values, member.isel(prediction_timedelta=0).values)]
        assert len(matches) == 1, m
        start = matches[0] - ds.prediction_timedelta.values[0]
        assert (start - start.astype("datetime64[D]")) == np.timedelta64(0)  # the init's hour of day (00 UTC)
        for lead in ds.prediction_timedelta.values:
            np.testing.assert_array_equal(member.sel(prediction_timedelta=lead).values, analysis.temperature.sel(time=start + lead).values)
    assert len({float(ds.temperature.isel(number=m, time=0, prediction_timedelta=0).mean()) for m in range(6)}) > 2
    again = forecaster.ensemble(init=[INIT], members=6, lead="48h", model="climatology", data=analysis, batch_size=2, seed=1)
    np.testing.assert_array_equal(values(again), values(ds))
    other = forecaster.ensemble(init=[INIT], members=6, lead="48h", model="climatology", data=analysis, seed=2)
    assert not np.array_equal(values(other), values(ds))
    assert ds.attrs["network_evaluations_per_member_step"] == 0

def test_climatology_without_training_years_is_refused_before_any_output(tmp_path, capsys):
    """The bundled analyses hold test-period inits only: a one-line error and no store."""
    assert main(["-q", "ensemble", "--model", "climatology", "--members", "2", "--lead", "24h", "--out", str(tmp_path / "c.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training period" in err and "--data" in err
    assert not (tmp_path / "c.zarr").exists()


def test_stored_decomposition_equals_the_one_from_the_members(forecaster, analysis, tmp_path):
    ds = run(forecaster, analysis, out=tmp_path / "fc.zarr", members=6, weights=3)
    stored = xr.open_zarr(tmp_path / "fc.zarr", group="decomposition").load()
    for name in ("geopotential", "2m_temperature"):
        recomputed = decompose(ds[name])  # reads the member coordinates, reorders, splits: an independent path
        for part in ("epistemic", "aleatoric", "total"):
            np.testing.assert_allclose(stored[f"{name}_{part}_variance"].values, recomputed[part].values, rtol=2e-4, atol=1e-6)
    assert ds.attrs["complete"] is True or ds.attrs["complete"] == 1
    # The uncertainty maps of the engine's own store: epistemic² + aleatoric² = total² (Ê clipped at 0, as the maps say).
    import bdlens

    maps = bdlens.uncertainty_maps(xr.open_zarr(tmp_path / "fc.zarr"), variables=["geopotential"], levels=[500]).compute()
    e, a, t = (maps[f"geopotential_{q}_std"].sel(level=500).values for q in ("epistemic", "aleatoric", "total"))
    np.testing.assert_allclose(e**2 + a**2, t**2, rtol=1e-6)
    total = stored["geopotential_total_variance"].sel(level=500).values
    clipped = np.maximum(stored["geopotential_epistemic_variance"].sel(level=500).values, 0) + stored["geopotential_aleatoric_variance"].sel(level=500).values
    np.testing.assert_allclose(t**2, clipped, rtol=1e-3, atol=0.1)  # float64 maps vs the float32 store (cancellation in Ê)
    assert np.all(clipped >= total - 1e-3)
    assert ds.attrs["network_evaluations_per_member_step"] == 1.0
    assert ds.attrs["wall_seconds_per_member_step"] > 0


def test_resume_after_a_kill_in_the_middle_of_a_lead_is_bit_identical(forecaster, analysis, tmp_path, monkeypatch):
    straight = run(forecaster, analysis, out=tmp_path / "a.zarr", members=8, weights=4, batch_size=2).load()
    writes = {"n": 0}
    original = engine_module.write_region

    def killed(*args, **kw):
        writes["n"] += 1
        if writes["n"] == 3:  # the second batch's first lead: a unit half written
            raise KeyboardInterrupt
        original(*args, **kw)

    monkeypatch.setattr(engine_module, "write_region", killed)
    monkeypatch.setattr(engine_module, "CHUNK_MEMBERS", 4)
    with pytest.raises(KeyboardInterrupt):
        run(forecaster, analysis, out=tmp_path / "b.zarr", members=8, weights=4, batch_size=2)
    monkeypatch.setattr(engine_module, "write_region", original)
    with pytest.raises(BdlensError, match="unfinished"):
        engine_module.open_forecast(tmp_path / "b.zarr")
    with pytest.raises(BdlensError, match="other options"):
        run(forecaster, analysis, out=tmp_path / "b.zarr", members=8, weights=4, seed=5, resume=True)
    resumed = run(forecaster, analysis, out=tmp_path / "b.zarr", members=8, weights=4, batch_size=2, resume=True).load()
    np.testing.assert_array_equal(values(resumed), values(straight))


def test_output_is_never_overwritten_without_being_asked(forecaster, analysis, tmp_path, capsys):
    out = tmp_path / "fc.zarr"
    run(forecaster, analysis, out=out)
    with pytest.raises(BdlensError, match="already exists"):
        run(forecaster, analysis, out=out)
    run(forecaster, analysis, out=out, overwrite=True, seed=9)
    (out / "notes.txt").write_text("mine")  # a file the user put into a bdlens store is never deleted
    with pytest.raises(BdlensError, match="notes.txt"):
        run(forecaster, analysis, out=out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BdlensError, match="not written by bdlens"):
        run(forecaster, analysis, out=foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def data_file(analysis, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "analysis.zarr"
    analysis.to_zarr(path, zarr_format=2)
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["-q", "ensemble", "--members", "4", "--weights", "2", "--lead", "24h", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init", "1999-01-01T00"], "no analysis at 1999-01-01T00:00"),
        (["--init", "2000-01-10T00", "2000-01-10T00"], "same time twice"),
        (["--weights", "3"], "not a multiple of --weights 3"),
        (["--no-bayes"], "cannot be combined with --no-bayes"),
        (["--lead", "5h", "--output-step", "5h"], "cannot be reached"),
        (["--lead", "soon"], "positive duration"),
        (["--batch-size", "3"], "multiple of the 2 perturbation draws"),
        (["--lead", "0h"], "positive duration"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_bad_options_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, data_file, args, message):
    out = tmp_path / "fc.zarr"
    init = [] if "--init" in args else ["--init", INIT]
    code, err = cli(capsys, "--data", str(data_file), "--out", str(out), *init, *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path, data_file):
    code, err = cli(capsys, "--data", str(data_file), "--init", INIT, "--out", str(tmp_path / "fc.zarr"), "--device", "cuda")
    assert code == 2 and "no CUDA device" in err, err


def test_bad_data_and_checkpoints_exit_2(capsys, tmp_path, analysis, data_file):
    out = tmp_path / "fc.zarr"
    missing = tmp_path / "missing.zarr"
    analysis.drop_vars("temperature").to_zarr(missing, zarr_format=2)
    code, err = cli(capsys, "--data", str(missing), "--init", INIT, "--out", str(out))
    assert code == 2 and "temperature" in err, err
    nan = tmp_path / "nan.zarr"
    bad = analysis.copy(deep=True)
    bad["geopotential"].loc[{"time": INIT}] = np.nan
    bad.to_zarr(nan, zarr_format=2)
    code, err = cli(capsys, "--data", str(nan), "--init", INIT, "--out", str(out))
    assert code == 2 and "NaN" in err, err
    coarse = tmp_path / "coarse.zarr"
    analysis.isel(longitude=slice(0, None, 2)).to_zarr(coarse, zarr_format=2)
    code, err = cli(capsys, "--data", str(coarse), "--init", INIT, "--out", str(out))
    assert code == 2 and "grid" in err, err
    # A corrupt checkpoint and a manifest of the wrong kind.
    from bdlens.checkpoint import BUNDLED_DIR

    broken = tmp_path / "broken"
    shutil.copytree(BUNDLED_DIR / "vi_6h", broken / "vi_6h")
    weights = broken / "vi_6h" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = cli(capsys, "--checkpoint", str(broken), "--data", str(data_file), "--init", INIT, "--lead", "6h", "--output-step", "6h",
                    "--out", str(out))
    assert code == 2 and "corrupted" in err, err
    wrong = tmp_path / "wrong"
    (wrong / "x").mkdir(parents=True)
    (wrong / "x" / "manifest.json").write_text('{"kind": "diffusion-ish"}')
    code, err = cli(capsys, "--checkpoint", str(wrong), "--data", str(data_file), "--init", INIT, "--out", str(out))
    assert code == 2 and "diffusion-ish" in err, err
    existing = tmp_path / "existing.zarr"
    existing.mkdir()
    (existing / "x").write_text("user data")
    code, err = cli(capsys, "--data", str(data_file), "--init", INIT, "--out", str(existing))
    assert code == 2 and "already exists; pass --resume to continue it" in err, err
    assert (existing / "x").read_text() == "user data"
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one(tmp_path, data_file):
    common = ["ensemble", "--members", "8", "--weights", "4", "--lead", "24h", "--init", INIT, "--data", str(data_file),
              "--perturbation", "sppt", "--seed", "1", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "bdlens", "-q", *common, "--out", str(tmp_path / "one.zarr")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bdlens", "-q", *common,
                          "--out", str(tmp_path / "two.zarr")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a, b = xr.open_zarr(tmp_path / "one.zarr").load(), xr.open_zarr(tmp_path / "two.zarr").load()
    np.testing.assert_array_equal(values(a), values(b))
    ledger = sorted(p.name for p in (tmp_path / "two.zarr" / ".bdlens-ledger").glob("*.json"))
    assert ledger == ["0-0.json", "0-1.json"]
