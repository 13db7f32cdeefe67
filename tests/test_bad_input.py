"""Bad input, damaged files and interruptions (issue 14): each case exits with code 2 and a one-line
message saying what to do, and leaves every file the user had exactly as it was (names, sizes,
contents); interrupted outputs are recognised and cleaned by the next run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_evaluate import make_forecast, make_truth, store
from test_perturbation_learned import perturb_config, world  # noqa: F401  (a tiny VI posterior and its data)
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)

import bdlens.checkpoint as checkpoint
import bdlens.training.bundle as training_bundle
from bdlens.cli import main
from bdlens.outputs import MARKER, prepare_output

REPO = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``roots``: path → (size, SHA-256), to show that nothing the user had changed."""
    files = {}
    for root in roots:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                files[str(path)] = (len(data), hashlib.sha256(data).hexdigest())
    return files


def refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    """Run the CLI; assert exit code 2 and a one-line message containing each of ``expected``."""
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def train_det(tiny_setup: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(out), *extra]


# ---------------------------------------------------------------------------------------------
# Never lose what the user has


def test_overwrite_refuses_a_directory_bdlens_did_not_write(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    refused(capsys, train_det(tiny_setup, mine, "--overwrite"), "not written by bdlens", "thesis.tex", "move it away")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_bdlens_run_holding_a_user_file(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = tmp_path / "run"
    assert main(["-q", *train_det(tiny_setup, run)]) == 0
    assert json.loads((run / MARKER).read_text())["kind"] == "training run"
    (run / "notes.md").write_text("lr 3e-3 diverged")
    (run / "checkpoint" / "calibration.json").write_text("{}")
    before = snapshot(tmp_path)
    refused(capsys, train_det(tiny_setup, run, "--overwrite"), "files bdlens did not write", "notes.md", "checkpoint/calibration.json")
    assert snapshot(tmp_path) == before
    (run / "notes.md").unlink()
    (run / "checkpoint" / "calibration.json").unlink()
    assert main(["-q", *train_det(tiny_setup, run, "--overwrite")]) == 0  # a pure bdlens run is replaced


def test_overwrite_never_deletes_an_input(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    before = snapshot(tiny_setup)
    refused(capsys, train_det(tiny_setup, tiny_setup, "--overwrite"), "also an input")  # the folder of the configs and data
    refused(capsys, train_det(tiny_setup, tiny_setup / "data.zarr", "--overwrite"), "also an input")
    assert snapshot(tiny_setup) == before


def test_vi_output_holding_its_source_checkpoint_is_refused(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = tmp_path / "det"
    assert main(["-q", *train_det(tiny_setup, run)]) == 0
    (tmp_path / "vi.yaml").write_text(yaml.safe_dump({"training": {"steps": 1, "batch_size": 2}}))
    before = snapshot(tmp_path)
    vi = ["train", "vi", "--from", str(run / "checkpoint"), "--config", str(tmp_path / "vi.yaml")]
    refused(capsys, [*vi, "--out", str(run), "--overwrite"], "also an input", str(run / "checkpoint"))
    refused(capsys, [*vi, "--out", str(run / "checkpoint"), "--resume"], "also an input")
    assert snapshot(tmp_path) == before


def test_run_directory_from_before_the_marker_is_recognised(tmp_path: Path) -> None:
    """An old run (state.pt, metrics.jsonl, checkpoint/ and nothing else) may be resumed or replaced."""
    from bdlens.training.run import RUN_KIND, RUN_LAYOUT

    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    for name in ("state.pt", "metrics.jsonl", "checkpoint/model.safetensors", "checkpoint/manifest.json"):
        (old / name).write_text("x")
    kwargs = {"layout": RUN_LAYOUT, "required": ("state.pt", "metrics.jsonl")}
    assert prepare_output(old, RUN_KIND, resume=True, **kwargs) is True
    assert prepare_output(old, RUN_KIND, overwrite=True, clear=False, **kwargs) is False and old.exists()
    (old / "state.pt").unlink()  # an old run killed before its first save looks like anyone's folder
    with pytest.raises(Exception, match="not written by bdlens"):
        prepare_output(old, RUN_KIND, overwrite=True, **kwargs)
    assert (old / "metrics.jsonl").is_file()


def test_resumed_perturbation_run_keeps_files_it_did_not_write(world: dict, tmp_path: Path, capsys) -> None:  # noqa: F811
    config = perturb_config(steps=2, checkpoint_every=2)
    (tmp_path / "p.yaml").write_text(json.dumps(config.model_dump(mode="json")))
    args = ["-q", "train", "perturb", "--from", str(world["vi"]), "--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    (tmp_path / "run" / "checkpoint" / "calibration.json").write_text('{"amplitude": 0.9}')
    (tmp_path / "run" / "notes.md").write_text("mine")
    kept = snapshot(tmp_path / "run" / "checkpoint" / "calibration.json", tmp_path / "run" / "notes.md")
    config = perturb_config(steps=3, checkpoint_every=2)
    (tmp_path / "p.yaml").write_text(json.dumps(config.model_dump(mode="json")))
    refused(capsys, [*args[1:], "--resume"], "different perturbation config")  # steps is part of the schedule
    assert snapshot(tmp_path / "run" / "checkpoint" / "calibration.json", tmp_path / "run" / "notes.md") == kept


def test_calibrate_refuses_an_input_or_a_foreign_folder_as_out(tmp_path: Path, capsys) -> None:
    """`bdlens calibrate` checks --out before loading anything: never the system it calibrates (its
    ensemble.json is an input), never a folder bdlens did not write."""
    from bdlens.checkpoint import BUNDLED_DIR

    before = snapshot(BUNDLED_DIR / "ensemble.json")
    refused(capsys, ["calibrate", "--perturbation", "sppt", "--out", str(BUNDLED_DIR), "--overwrite"], "also an input")
    assert snapshot(BUNDLED_DIR / "ensemble.json") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    refused(capsys, ["calibrate", "--perturbation", "sppt", "--out", str(tmp_path / "mine"), "--overwrite"], "notes.md")
    assert (tmp_path / "mine" / "notes.md").read_text() == "mine"


def test_a_killed_run_leaves_a_partial_that_the_next_run_removes(tmp_path: Path) -> None:
    """SIGKILL inside atomic_directory (as a killed `bdlens world ensemble` would be): the partial stays
    only until the next run on the same output, which removes it and finishes normally."""
    target = tmp_path / "ens.zarr"
    code = (
        "import os, signal, sys\n"
        "from bdlens.world.store import atomic_directory\n"
        f"with atomic_directory({str(target)!r}, 'forecast store') as tmp:\n"
        "    (tmp / 'half').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    partials = [p.name for p in tmp_path.iterdir()]
    assert len(partials) == 1 and partials[0].startswith(".ens.zarr.partial-")
    from bdlens.world.store import atomic_directory

    with atomic_directory(target, "forecast store") as tmp:
        (tmp / "done").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens.zarr"]
    assert (target / "done").read_text() == "y" and (target / MARKER).is_file()


def test_physics_ensemble_never_writes_over_its_world(tmp_path: Path, capsys) -> None:
    built = tmp_path / "world"
    built.mkdir()
    (built / "manifest.json").write_text("{}")
    before = snapshot(tmp_path)
    refused(capsys, ["world", "ensemble", "--world", str(built), "--init", "2000-01-02T00", "--out", str(built), "--overwrite"],
            "also an input")
    assert snapshot(tmp_path) == before


def test_evaluate_out_never_replaces_an_input_or_a_foreign_file(tmp_path: Path, capsys) -> None:
    truth = make_truth()
    forecast = store(make_forecast(truth, n_inits=4), tmp_path / "fc.zarr")
    truth.to_netcdf(tmp_path / "truth.nc")
    (tmp_path / "report.csv").write_text("my own table\n")
    before = snapshot(tmp_path)
    common = ["evaluate", forecast, "--truth", str(tmp_path / "truth.nc"), "--variables", "2m_temperature"]
    refused(capsys, [*common, "--out", str(tmp_path / "truth.nc"), "--overwrite"], "also an input")
    refused(capsys, [*common, "--out", str(tmp_path / "report.csv"), "--overwrite"], "not a bdlens metrics file")
    (tmp_path / "folder.nc").mkdir()
    refused(capsys, [*common, "--out", str(tmp_path / "folder.nc")], "is a directory")
    assert snapshot(tmp_path) == before


def test_bundle_never_replaces_its_own_source(tiny_setup: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    for module in (checkpoint, training_bundle):
        monkeypatch.setattr(module, "BUNDLED_DIR", tmp_path / "assets")
    run = tmp_path / "det"
    assert main(["-q", *train_det(tiny_setup, run)]) == 0
    bundled = training_bundle.bundle(run / "checkpoint", "det_tiny")
    before = snapshot(tmp_path)
    refused(capsys, ["train", "bundle", str(bundled), "--name", "det_tiny", "--overwrite"], "also an input")
    refused(capsys, ["train", "bundle", str(run / "checkpoint"), "--name", "../escape"], "letters, digits and underscores")
    assert snapshot(tmp_path) == before


def test_resume_refuses_changed_configs_content(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    """Same config file names, other content: a changed data split or model size is not resumed."""
    setup = tmp_path / "setup"
    setup.mkdir()
    for name in ("model.yaml", "data.yaml"):
        (setup / name).write_text((tiny_setup / name).read_text())
    train_cfg = yaml.safe_load((tiny_setup / "train.yaml").read_text())
    (setup / "train.yaml").write_text(yaml.safe_dump({**train_cfg, "model": str(setup / "model.yaml"), "data": str(setup / "data.yaml"),
                                                      "steps": 2, "checkpoint_every": 2}))
    run = tmp_path / "run"
    argv = ["train", "deterministic", "--config", str(setup / "train.yaml"), "--out", str(run)]
    assert main(["-q", *argv]) == 0
    data = yaml.safe_load((setup / "data.yaml").read_text())
    data["splits"]["train"]["end"] = "2000-01-08"
    (setup / "data.yaml").write_text(yaml.safe_dump(data))
    before = snapshot(run)
    refused(capsys, [*argv, "--resume"], "different data config", "--overwrite")
    (setup / "data.yaml").write_text((tiny_setup / "data.yaml").read_text())
    model = yaml.safe_load((setup / "model.yaml").read_text())
    (setup / "model.yaml").write_text(yaml.safe_dump({**model, "embed_dim": 16}))
    refused(capsys, [*argv, "--resume"], "different model config")
    assert snapshot(run) == before


def test_resume_refuses_a_changed_source_checkpoint(world: dict, tmp_path: Path, capsys) -> None:  # noqa: F811
    import shutil

    source = tmp_path / "vi"
    shutil.copytree(world["vi"], source)
    (tmp_path / "p.yaml").write_text(json.dumps(perturb_config(steps=2, checkpoint_every=2).model_dump(mode="json")))
    argv = ["train", "perturb", "--from", str(source), "--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "run")]
    assert main(["-q", *argv]) == 0
    from bdlens.bayes.posterior import load_posterior, save_posterior

    bayes, manifest = load_posterior(source)
    with torch.no_grad():
        bayes.posterior.mu.add_(1e-3)  # retrained in place
    save_posterior(bayes, source, manifest["norm_stats"], {k: manifest[k] for k in ("data_config", "training")})
    before = snapshot(tmp_path / "run")
    refused(capsys, [*argv, "--resume"], "different --from checkpoint")
    assert snapshot(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------
# Never score or train on something silently wrong


@pytest.fixture()
def scored(tmp_path: Path) -> dict:
    """A truth (netCDF) and a 4-member forecast zarr (v2, consolidated, one chunk per init) to score."""
    truth = make_truth()
    forecast = make_forecast(truth, n_inits=4).chunk({"time": 1})
    forecast.to_zarr(tmp_path / "fc.zarr", zarr_format=2, consolidated=True)
    truth.to_netcdf(tmp_path / "truth.nc")
    argv = ["evaluate", str(tmp_path / "fc.zarr"), "--truth", str(tmp_path / "truth.nc")]
    return {"truth": truth, "forecast": forecast, "argv": argv, "store": tmp_path / "fc.zarr"}


def test_a_missing_chunk_is_an_error_naming_it(scored: dict, capsys) -> None:
    (scored["store"] / "temperature" / "0.2.0.0.0.0").unlink()  # one init of one variable lost
    before = snapshot(scored["store"].parent)
    refused(capsys, scored["argv"], "incomplete zarr store", "temperature (1 of 4 chunks missing)")
    assert snapshot(scored["store"].parent) == before


def test_an_aleatoric_forecast_whose_writer_skipped_its_zero_coordinate_chunk_is_scored(scored: dict, tmp_path: Path) -> None:
    from bdlens.data.reader import open_dataset

    # One weight sample (K = 1, the deterministic weights): weight_sample = 0 for every member, zarr's default int fill.
    members = scored["forecast"].sizes["number"]
    ds = scored["forecast"].assign_coords(weight_sample=("number", np.zeros(members, np.int64)),
                                          perturbation_draw=("number", np.arange(members)))
    ds.to_zarr(tmp_path / "aleatoric.zarr", zarr_format=2, consolidated=True)
    # zarr-python 3 writes no chunk equal to the default fill (as `bdlens ensemble --no-bayes` stores show)
    (tmp_path / "aleatoric.zarr" / "weight_sample" / "0").unlink(missing_ok=True)
    assert open_dataset(tmp_path / "aleatoric.zarr").weight_sample.values.tolist() == [0] * members
    assert main(["-q", "evaluate", str(tmp_path / "aleatoric.zarr"), "--truth", str(tmp_path / "truth.nc"),
                 "--variables", "2m_temperature", "--out", str(tmp_path / "m.csv")]) == 0


def test_lost_array_metadata_is_an_error_naming_it(scored: dict, capsys) -> None:
    import shutil

    shutil.rmtree(scored["store"] / "2m_temperature")  # the consolidated metadata still lists it
    refused(capsys, scored["argv"], "incomplete zarr store", "2m_temperature (array metadata missing)")


def test_a_truncated_chunk_is_one_clear_line(scored: dict, capsys) -> None:
    chunk = scored["store"] / "temperature" / "0.1.0.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    refused(capsys, scored["argv"], "temperature", "truncated or corrupt")


def test_a_member_nan_everywhere_is_reported(scored: dict, tmp_path: Path, capsys) -> None:
    forecast = scored["forecast"].copy(deep=True).load()
    forecast["2m_temperature"][2] = float("nan")
    forecast.to_zarr(tmp_path / "nan.zarr", zarr_format=2)
    refused(capsys, ["evaluate", str(tmp_path / "nan.zarr"), "--truth", str(tmp_path / "truth.nc")], "member(s) 2", "NaN everywhere")
    truth = scored["truth"].copy(deep=True)
    truth["temperature"][:] = float("nan")
    truth.to_netcdf(tmp_path / "nan_truth.nc")
    refused(capsys, ["evaluate", str(scored["store"]), "--truth", str(tmp_path / "nan_truth.nc")], "truth's temperature is NaN")


def test_member_dimension_named_member_or_realization_is_scored(scored: dict, tmp_path: Path) -> None:
    from bdlens.evaluate import evaluate, open_data

    reference = evaluate({"f": scored["forecast"]}, scored["truth"], variables=["2m_temperature"])
    for name, extra in (("member", []), ("realization", ["--member-dim", "realization"]), ("ens", ["--member-dim", "ens"])):
        path = tmp_path / f"{name}.zarr"
        scored["forecast"].rename(number=name).to_zarr(path, zarr_format=2)
        out = tmp_path / f"{name}.nc"
        argv = ["-q", "evaluate", str(path), "--truth", str(tmp_path / "truth.nc"), "--variables", "2m_temperature", "--out", str(out), *extra]
        assert main(argv) == 0, name
        import xarray as xr

        got = xr.open_dataset(out)["2m_temperature"].sel(forecast=name)
        xr.testing.assert_allclose(got.drop_vars("forecast"), reference["2m_temperature"].sel(forecast="f").drop_vars("forecast"))
    assert "number" in open_data(tmp_path / "member.zarr").dims


def test_geopotential_height_in_metres_is_converted_and_other_units_refused(tmp_path: Path) -> None:
    from synthetic import synthetic_dataset

    from bdlens.data import open_dataset
    from bdlens.errors import BdlensError

    ds = synthetic_dataset(times=2, upper_variables=["geopotential"], surface_variables=[])
    height = ds.assign(geopotential=(ds["geopotential"] / 9.80665).assign_attrs(units="m"))
    height.to_zarr(tmp_path / "gh.zarr", zarr_format=2)
    read = open_dataset(tmp_path / "gh.zarr")
    assert read["geopotential"].attrs["units"] == "m**2 s**-2"
    import numpy as np

    np.testing.assert_allclose(read["geopotential"].values, height["geopotential"].values * 9.80665, rtol=1e-12)
    ds.assign(geopotential=ds["geopotential"].assign_attrs(units="dam")).to_zarr(tmp_path / "dam.zarr", zarr_format=2)
    with pytest.raises(BdlensError, match="units 'dam'"):
        open_dataset(tmp_path / "dam.zarr")


def test_levels_in_pa_are_recognised_from_their_units(tmp_path: Path) -> None:
    """Upper-stratosphere levels 100 and 500 Pa are small numbers: only the units attribute tells they are Pa."""
    from synthetic import synthetic_dataset

    from bdlens.data import open_dataset

    ds = synthetic_dataset(times=2, upper_variables=["temperature"], surface_variables=[])
    ds = ds.assign_coords(level=("level", [100.0, 500.0], {"units": "Pa"}))
    ds.to_zarr(tmp_path / "pa.zarr", zarr_format=2)
    assert open_dataset(tmp_path / "pa.zarr")["level"].values.tolist() == [1, 5]
    ds.assign_coords(level=("level", [100.0, 500.0], {"units": "hPa"})).to_zarr(tmp_path / "hpa.zarr", zarr_format=2)
    assert open_dataset(tmp_path / "hpa.zarr")["level"].values.tolist() == [100, 500]


def test_duplicate_init_times_and_non_positive_counts_are_refused(tmp_path: Path, capsys) -> None:
    import numpy as np

    from bdlens.errors import BdlensError
    from bdlens.world.ensemble import _init_indices

    times = np.arange("2000-01-01T00", "2000-01-05T00", np.timedelta64(6, "h"), dtype="datetime64[ns]")
    with pytest.raises(BdlensError, match="2000-01-02T00 given more than once"):
        _init_indices(times, times[::4], ["2000-01-02T00", "2000-01-03T00", "2000-01-02"])
    refused(capsys, ["train", "vi", "--from", "x", "--config", "c", "--out", "o", "--threads", "0"], "--threads must be at least 1 (got 0)")
    refused(capsys, ["calibrate", "--perturbation", "sppt", "--out", str(tmp_path / "o"), "--threads", "-2"], "--threads must be at least 1")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Clear messages instead of tracebacks


def fake_world(path: Path) -> Path:
    path.mkdir()
    summary = {f"field_{i}": list(range(50)) for i in range(200)}  # more than a pipe buffer once printed
    (path / "manifest.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00", "build_seconds": 1, "bdlens_version": "x",
                                                     "summary": summary}))
    return path


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    built = fake_world(tmp_path / "world")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bdlens", "world", "summary", str(built)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_posterior_manifest_missing_a_field_or_not_matching_its_weights(world: dict, tmp_path: Path, capsys) -> None:  # noqa: F811
    import shutil

    (tmp_path / "p.yaml").write_text(json.dumps(perturb_config(steps=1).model_dump(mode="json")))
    for name, change, expected in (
        ("no_names", lambda m: m["posterior"].pop("names"), "lacks the field posterior.names"),
        ("no_model", lambda m: m.pop("model_config"), "lacks the field model_config"),
        ("bigger", lambda m: m["model_config"].update(embed_dim=16), "does not match the model configuration"),
    ):
        vi = tmp_path / name
        shutil.copytree(world["vi"], vi)
        manifest = json.loads((vi / "manifest.json").read_text())
        change(manifest)
        (vi / "manifest.json").write_text(json.dumps(manifest))
        before = snapshot(vi)
        refused(capsys, ["train", "perturb", "--from", str(vi), "--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / f"run_{name}")],
                expected)
        assert snapshot(vi) == before and not (tmp_path / f"run_{name}").exists()


def test_library_info_lines_are_hidden_and_verbosity_goes_anywhere(tmp_path: Path) -> None:
    import logging

    from bdlens.cli import build_parser, configure_logging

    configure_logging(0, False)
    assert not logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.INFO)  # "Unable to initialize backend 'tpu'"
    assert logging.getLogger("bdlens.world.build").isEnabledFor(logging.INFO)
    configure_logging(2, False)
    assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.DEBUG)
    parser = build_parser()
    assert parser.parse_args(["world", "summary", "w", "-q"]).quiet is True
    assert parser.parse_args(["-q", "world", "summary", "w"]).quiet is True
    assert parser.parse_args(["train", "vi", "--from", "x", "--config", "c", "--out", "o", "-vv"]).verbose == 2
    assert parser.parse_args(["world", "summary", "w"]).verbose == 0
    configure_logging(0, False)


def test_progress_is_plain_log_lines_when_not_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from bdlens import progress

    assert not sys.stderr.isatty()  # pytest captures stderr
    with caplog.at_level(logging.INFO, logger="bdlens.progress"):
        for _ in progress.bar(range(3), desc="work", unit="item"):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "bdlens.progress"]
    assert lines and lines[-1].startswith("work: 3/3 item") and not any("\r" in line or "█" in line for line in lines)


def test_times_in_messages_are_iso_to_the_minute(tmp_path: Path, capsys) -> None:
    truth = make_truth()
    late = make_forecast(truth, n_inits=2).assign_coords(time=truth["time"].values[:2] + np.timedelta64(30, "D"))
    forecast = store(late, tmp_path / "late.zarr")
    truth.to_netcdf(tmp_path / "truth.nc")
    err = refused(capsys, ["evaluate", forecast, "--truth", str(tmp_path / "truth.nc")], "no valid time", "2020-01-31T00:00", "2020-01-01T00:00")
    assert ".000000000" not in err


def test_an_interrupted_run_says_how_to_resume(tiny_setup: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from interrupt import stop_after_saving

    import bdlens.training.loop as det

    stop_after_saving(monkeypatch, det, 2)
    capsys.readouterr()
    assert main(["-q", *train_det(tiny_setup, tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and str(tmp_path / "run") in err
    monkeypatch.undo()
    resume = err.split("with: ", 1)[1].strip().split()[1:]  # the printed command, without "bdlens"
    assert main(["-q", *resume]) == 0
