"""The demo study script (evaluation/study.py) on the small world with tiny settings: resumable units,
an identical CSV after recomputing one unit, the scores against independent references, and bad options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bdlens.ensemble import Forecaster
from bdlens.grid import lat_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
import common  # noqa: E402
import study  # noqa: E402
import study_report  # noqa: E402
from common import FIELDS  # noqa: E402

SYSTEMS = ("deterministic", "hybrid", "deep-ensemble", "physics")
PERIOD = (np.datetime64("2000-01-03"), np.datetime64("2000-01-20"))
BUNDLED = Path(__file__).resolve().parents[1] / "bdlens" / "assets" / "models"


def _physics_store(small_world: Path, path: Path) -> Path:
    """A stand-in for a `bdlens world ensemble` store at the study's inits: 3 members = truth + small noise."""
    truth = xr.open_zarr(small_world / "truth.zarr")
    inits = common.test_inits(truth, 48, 72, PERIOD)[:2]
    leads = np.array([24, 48], "timedelta64[h]").astype("timedelta64[ns]")
    valid = truth.sel(time=xr.DataArray(inits, dims="time") + xr.DataArray(leads, dims="prediction_timedelta")).load()
    valid = valid.drop_vars("time").assign_coords(time=inits, prediction_timedelta=leads)
    rng = np.random.default_rng(1)
    members = xr.concat([valid + 0.01 * valid.std() * rng.normal() for _ in range(3)], dim="number").assign_coords(number=np.arange(3))
    members.astype(np.float32).to_zarr(path, mode="w", consolidated=True, zarr_format=2)
    return path


def _args(small_world: Path, root: Path, *extra: str) -> list[str]:
    return ["--world", str(small_world), "--period", *map(str, PERIOD), "--inits", "2", "--every-days", "3",
            "--leads", "1d", "2d", "--members", "4", "--hybrid-members", "4", "--weights", "2", "--device", "cpu", "--threads", "1",
            "--work", str(root / "work"), "--out", str(root / "study.csv"), "--readme", str(root / "README.md"),
            "--report", str(root / "report"), "-q", *extra]


@pytest.fixture(scope="module")
def ran(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("study")
    physics = _physics_store(small_world, root / "physics.zarr")
    # Two copies of the bundled deterministic model (each checkpoint gets the bundled model of the other step).
    args = _args(small_world, root, "--systems", *SYSTEMS, "--physics", str(physics),
                 "--deep-ensemble", str(BUNDLED / "det_24h"), str(BUNDLED / "det_6h"))
    assert study.main(args) == 0
    return root, args


def _units(root: Path) -> list[Path]:
    return sorted((root / "work" / "units").rglob("*.json"))


def test_a_deleted_unit_is_recomputed_alone_and_the_csv_is_identical(ran, monkeypatch):
    root, args = ran

    def scores() -> list[str]:  # every line but the measured wall time, which a recomputed unit measures anew
        return [line for line in (root / "study.csv").read_text().splitlines() if "wall_seconds" not in line]

    first = scores()
    units = _units(root)
    assert len(units) == 2 * len(SYSTEMS)
    units[-1].unlink()
    computed = []
    real = study.run_unit
    monkeypatch.setattr(study, "run_unit", lambda work, plan, init, *rest: computed.append((plan.name, init)) or real(work, plan, init, *rest))
    assert study.main(args) == 0
    assert len(computed) == 1 and units[-1].is_file()
    assert scores() == first and len(first) > 100
    assert (root / "work" / "scratch").is_dir() and not any((root / "work" / "scratch").rglob("*.zarr"))  # forecasts deleted


def test_deterministic_crps_is_the_area_weighted_mae_of_an_independent_run(ran, small_world):
    """One member: the unit's CRPS is the MAE against the truth at init + lead (cell-area weights)."""
    root, _ = ran
    unit = json.loads(sorted((root / "work" / "units" / "deterministic").glob("*.json"))[0].read_text())
    init = np.datetime64(unit["init"])
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    truth = xr.open_zarr(small_world / "truth.zarr")
    run = Forecaster.from_pretrained(device="cpu").ensemble(init=[str(init)], members=1, bayes=False, perturbation="none",
                                                            lead="48h", output_step="24h", data=analysis)
    weights = lat_weights(truth.latitude.values)[:, None]
    rows = {(f, lead, stat): v for f, lead, stat, v in unit["rows"]}
    for key, (variable, level) in FIELDS.items():
        for lead in (24, 48):
            fc = run[variable].sel(prediction_timedelta=np.timedelta64(lead, "h")).isel(number=0, time=0)
            tr = truth[variable].sel(time=init + np.timedelta64(lead, "h"))
            if level is not None:
                fc, tr = fc.sel(level=level), tr.sel(level=level)
            mae = float((np.abs(fc.values - tr.values) * weights).mean())
            np.testing.assert_allclose(rows[(key, lead, "crps")], mae, rtol=1e-5)


def test_the_csv_holds_every_metric_and_the_identities_hold(ran):
    root, _ = ran
    table = pd.read_csv(root / "study.csv")
    assert list(table.columns) == list(study.CSV_COLUMNS)
    hybrid = table[table.system == "hybrid"]
    for metric in ("crps", "rmse", "spread_skill", "rank_flatness", "energy_score", "calibration_residual",
                   "total_variance_residual", "mixture_crps_gap", "epistemic_variance", "aleatoric_variance"):
        assert len(hybrid[(hybrid.metric == metric) & (hybrid.variable != study.ALL)]) == 2 * len(FIELDS), metric
    assert len(table[(table.variable == study.ALL) & (table.metric == "energy_score")]) == 2 * len(SYSTEMS)  # multivariate
    # §6.1 on population moments is exact up to float32 rounding; §6.3 with the standard CRPS holds pointwise.
    assert hybrid[hybrid.metric == "total_variance_residual"].value.max() < 1e-5
    assert (hybrid[hybrid.metric == "mixture_crps_gap"].value >= 0).all()
    # The corrected spread-skill ratio and the calibration ratio are two views of the same identity.
    ssr = hybrid[hybrid.metric == "spread_skill"].set_index(["variable", "lead_hours"]).value
    ratio = hybrid[hybrid.metric == "calibration_ratio"].set_index(["variable", "lead_hours"]).value
    np.testing.assert_allclose(ratio, 1 / ssr**2, rtol=1e-12)
    det = table[(table.system == "deterministic") & (table.metric == "spread_skill")]
    assert det.empty  # one member: no spread
    # Two identical members: the fair CRPS is their MAE (the spread term vanishes), the deterministic system's.
    crps = table[table.metric == "crps"].set_index(["system", "variable", "lead_hours"]).value
    np.testing.assert_allclose(crps["deep-ensemble"], crps["deterministic"], rtol=1e-6)
    cost = table[(table.metric == "wall_seconds_per_member_step")]
    assert set(cost.system) == set(SYSTEMS) - {"physics"} and (cost.value > 0).all()  # the physics store was made elsewhere
    readme = (root / "README.md").read_text()
    assert study_report.README_BEGIN in readme and "| hybrid |" in readme and "not evaluated: needs the system(s) diffusion" in readme
    gap = 100 * (crps["hybrid", "z500", 24] / crps["physics", "z500", 24] - 1)
    assert f"Z500 1 d {gap:+.0f} %" in readme and "| met (stated) |" in readme
    html = (root / "report" / "report.html").read_text()
    assert 'id="goals"' in html and 'id="theorems"' in html and "data:image/png;base64," in html


def _brute_energy(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Fair energy score, O(M² D) with explicit loops over member pairs; norm sqrt(Σ w v²)."""
    m = x.shape[0]
    norm = lambda v: np.sqrt((w * v**2).sum())  # noqa: E731
    skill = np.mean([norm(x[i] - y) for i in range(m)])
    spread = sum(norm(x[i] - x[j]) for i in range(m) for j in range(m))
    return skill - spread / (2 * m * (m - 1))


def test_energy_scores_equal_the_brute_force_formula():
    rng = np.random.default_rng(4)
    lat, lon = np.linspace(-80, 80, 5), np.arange(0, 360, 60.0)
    coords = {"number": np.arange(3), "time": [np.datetime64("2000-01-05T00", "ns")],
              "prediction_timedelta": [np.timedelta64(24, "h").astype("timedelta64[ns]")], "latitude": lat, "longitude": lon}
    dims = tuple(coords)
    forecast = xr.Dataset({k: (dims, rng.normal(size=(3, 1, 1, 5, 6))) for k in FIELDS}, coords=coords)
    truth = xr.Dataset({k: (("time", "latitude", "longitude"), rng.normal(size=(2, 5, 6))) for k in FIELDS},
                       coords={"time": [np.datetime64("2000-01-05T00", "ns"), np.datetime64("2000-01-06T00", "ns")],
                               "latitude": lat, "longitude": lon})
    scale = {k: 1.0 + i for i, k in enumerate(FIELDS)}
    rows = {(f, stat): v for f, _, stat, v in study.unit_rows(forecast, truth, scale, seed=0)}
    w = np.repeat(lat_weights(lat)[:, None], len(lon), axis=1).ravel()
    y = {k: truth[k].isel(time=1).values.ravel() for k in FIELDS}  # valid time = init + 24 h
    x = {k: forecast[k].values[:, 0, 0].reshape(3, -1) for k in FIELDS}
    for k in FIELDS:
        assert rows[(k, "energy_score")] == pytest.approx(_brute_energy(x[k], y[k], w), rel=1e-10)
    stacked_x = np.concatenate([x[k] / scale[k] for k in FIELDS], axis=1)
    stacked_y = np.concatenate([y[k] / scale[k] for k in FIELDS])
    assert rows[(study.ALL, "energy_score")] == pytest.approx(_brute_energy(stacked_x, stacked_y, np.tile(w, len(FIELDS))), rel=1e-10)


@pytest.mark.parametrize("extra, message", [
    (["--systems", "hybrid", "unicorn"], "unknown system(s) unicorn"),
    (["--members", "1"], "at least 2"),
    (["--leads", "5x"], "--leads must be a positive duration"),
    (["--inits", "many"], "invalid int value"),
    (["--physics", "/nonexistent/phys.zarr"], "--physics /nonexistent/phys.zarr does not exist"),
])
def test_bad_options_exit_2_with_one_line_before_any_work(small_world, tmp_path, capsys, extra, message):
    assert study.main(_args(small_world, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("study: error:") and message in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "study.csv").exists()


def test_a_deep_ensemble_path_that_is_no_checkpoint_is_refused(small_world, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    assert study.main(_args(small_world, tmp_path, "--systems", "deep-ensemble", "--deep-ensemble", str(tmp_path / "notes"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a checkpoint directory" in err
    assert not (tmp_path / "work").exists()


def _table(rows: list[tuple[str, str, int, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(study.CSV_COLUMNS))


def test_goal_verdicts_follow_the_numbers():
    rows = [(s, "all", -1, "members", 20.0) for s in ("hybrid", "diffusion")]
    rows += [("hybrid", "all", -1, "wall_seconds_per_member_step", 0.01), ("diffusion", "all", -1, "wall_seconds_per_member_step", 0.5)]
    for key in ("z500", "t850"):
        rows += [("hybrid", key, lead, "crps", 1.0) for lead in (24, 48)] + [("diffusion", key, lead, "crps", 2.0) for lead in (24, 48)]
    verdict = {goal: v for goal, v, _ in study_report.goals(_table(rows))}
    first = next(g for g in verdict if g.startswith("Hybrid fair CRPS"))
    assert verdict[first] == "met"
    worse = [r if r[:4] != ("hybrid", "t850", 48, "crps") else (*r[:4], 2.5) for r in rows]
    assert dict((g, v) for g, v, _ in study_report.goals(_table(worse)))[first] == "not met"
    dearer = [r if r[:4] != ("hybrid", "all", -1, "wall_seconds_per_member_step") else (*r[:4], 0.03) for r in rows]  # 1/16.7 of diffusion
    assert dict((g, v) for g, v, _ in study_report.goals(_table(dearer)))[first] == "not met"
    assert any(v.startswith("not evaluated") for v in verdict.values())  # no epistemic, physics, …
