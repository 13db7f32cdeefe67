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

from bdlens.checkpoint import BUNDLED_DIR
from bdlens.ensemble import Forecaster
from bdlens.grid import lat_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
import common  # noqa: E402
import study  # noqa: E402
import study_report  # noqa: E402
from common import FIELDS  # noqa: E402

SYSTEMS = ("deterministic", "hybrid", "deep-ensemble", "deep-ensemble-sppt", "physics")
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
            "--leads", "6h", "1d", "2d", "--members", "4", "--hybrid-members", "4", "--weights", "2", "--device", "cpu", "--threads", "1",
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


COST = "wall_seconds|network_evaluations"  # the cost pass's rows


def _elsewhere(args: list[str], out: Path) -> list[str]:
    """The fixture's arguments with the CSV, README and report written under ``out`` and no cost pass."""
    moved = {"--out": out / "study.csv", "--readme": out / "README.md", "--report": out / "report"}
    return [*(str(moved[args[i - 1]]) if i and args[i - 1] in moved else a for i, a in enumerate(args)), "--no-cost"]


def _scores(csv: Path) -> list[str]:
    return [line for line in csv.read_text().splitlines() if not any(m in line for m in COST.split("|"))]


def test_a_deleted_unit_is_recomputed_alone_and_the_csv_is_identical(ran, monkeypatch, tmp_path):
    root, args = ran
    units = _units(root)
    assert len(units) == 2 * len(SYSTEMS)
    units[-1].unlink()
    computed = []
    real = study.run_unit
    monkeypatch.setattr(study, "run_unit", lambda work, plan, init, *rest: computed.append((plan.name, init)) or real(work, plan, init, *rest))
    assert study.main(_elsewhere(args, tmp_path)) == 0
    assert len(computed) == 1 and units[-1].is_file()
    first = _scores(root / "study.csv")
    assert _scores(tmp_path / "study.csv") == first and len(first) > 100
    assert (root / "work" / "scratch").is_dir() and not any((root / "work" / "scratch").rglob("*.zarr"))  # forecasts deleted


def test_deterministic_crps_is_the_area_weighted_mae_of_an_independent_run(ran, small_world):
    """One member: the unit's CRPS is the MAE against the truth at init + lead (cell-area weights), the
    reference run being one forecast at the finest output step (the study runs the 6 h lead apart)."""
    root, _ = ran
    unit = json.loads(sorted((root / "work" / "units" / "deterministic").glob("*.json"))[0].read_text())
    init = np.datetime64(unit["init"])
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    truth = xr.open_zarr(small_world / "truth.zarr")
    run = Forecaster.from_pretrained(device="cpu").ensemble(init=[str(init)], members=1, bayes=False, perturbation="none",
                                                            lead="48h", output_step="6h", data=analysis)
    weights = lat_weights(truth.latitude.values)[:, None]
    rows = {(f, lead, stat): v for f, lead, stat, v in unit["rows"]}
    for key, (variable, level) in FIELDS.items():
        for lead in (6, 24, 48):
            fc = run[variable].sel(prediction_timedelta=np.timedelta64(lead, "h")).isel(number=0, time=0)
            tr = truth[variable].sel(time=init + np.timedelta64(lead, "h"))
            if level is not None:
                fc, tr = fc.sel(level=level), tr.sel(level=level)
            mae = float((np.abs(fc.values - tr.values) * weights).mean())
            np.testing.assert_allclose(rows[(key, lead, "crps")], mae, rtol=1e-5)


def test_units_hold_scores_only_and_no_cost_pass_changes_no_score(ran, tmp_path):
    root, args = ran
    assert all("cost" not in json.loads(p.read_text()) for p in _units(root))
    assert study.main(_elsewhere(args, tmp_path)) == 0
    with_cost = pd.read_csv(root / "study.csv")
    without = pd.read_csv(tmp_path / "study.csv")
    assert with_cost.metric.str.contains(COST).any() and not without.metric.str.contains(COST).any()
    pd.testing.assert_frame_equal(without, with_cost[~with_cost.metric.str.contains(COST)].reset_index(drop=True))


def test_the_csv_holds_every_metric_and_the_identities_hold(ran):
    root, _ = ran
    table = pd.read_csv(root / "study.csv")
    assert list(table.columns) == list(study.CSV_COLUMNS)
    hybrid = table[table.system == "hybrid"]
    for metric in ("crps", "rmse", "spread_skill", "rank_flatness", "energy_score", "calibration_residual",
                   "total_variance_residual", "mixture_crps_gap", "epistemic_variance", "aleatoric_variance"):
        assert len(hybrid[(hybrid.metric == metric) & (hybrid.variable != study.ALL)]) == 3 * len(FIELDS), metric
    # multivariate, at every lead a system reports (the physics stand-in store has no 6 h lead)
    assert len(table[(table.variable == study.ALL) & (table.metric == "energy_score")]) == 3 * len(SYSTEMS) - 1
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
    # The deep ensemble with SPPT is a K × J design: 2 models × 2 draws (members 4 / 2 models).
    deep = table[table.system == "deep-ensemble-sppt"].set_index(["variable", "metric", "lead_hours"]).value.sort_index()
    assert deep["all", "members", -1] == 4 and deep["z500", "total_variance_residual"].max() < 1e-5
    assert (deep["z500", "mixture_crps_gap"] >= 0).all() and (deep["z500", "aleatoric_variance"] > 0).all()
    # Paired by init, the mean difference is the difference of the means (both average the same inits).
    paired = table[table.metric == "crps_minus_hybrid"].set_index(["system", "variable", "lead_hours"]).value
    assert set(paired.index.get_level_values("system")) == set(SYSTEMS) - {"hybrid"}
    for (system, variable, lead), value in paired.items():
        np.testing.assert_allclose(value, crps[system, variable, lead] - crps["hybrid", variable, lead], rtol=1e-9, atol=1e-12)
    cost = table[(table.metric == "wall_seconds_per_member_step")]
    # The cost pass times every system, the physics ensemble too although its store was made elsewhere.
    assert set(cost.system) == set(SYSTEMS) and (cost.value > 0).all()
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


def test_lead_groups_split_off_the_leads_between_long_steps():
    assert study.lead_groups((6, 24), [6, 24, 48, 240]) == [([24, 48, 240], 24), ([6], 6)]
    assert study.lead_groups((24,), [6, 24, 48]) == [([24, 48], 24)]  # 6 h is out of a 24 h model's reach
    assert study.lead_groups((6, 24), [6, 12]) == [([6, 12], 6)]
    assert study.lead_groups((6, 24), [30, 48]) == [([48], 24), ([30], 30)]


def test_a_lead_run_apart_is_the_same_member_state(small_world, tmp_path):
    """The engine's anchored plan makes a member's state at a lead independently of the other output
    leads: the study's two runs (6 h; whole days) equal one run at 6-hourly output, bit for bit."""
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    forecaster = Forecaster.from_pretrained(device="cpu")
    init = str(xr.open_zarr(small_world / "truth.zarr").time.values[40])[:13]
    options = dict(init=[init], data=analysis, members=4, weights=2, perturbation="sppt", seed=0)
    fine = forecaster.ensemble(out=tmp_path / "fine.zarr", lead="24h", output_step="6h", **options)
    days = forecaster.ensemble(out=tmp_path / "days.zarr", lead="24h", output_step="24h", **options)
    short = forecaster.ensemble(out=tmp_path / "short.zarr", lead="6h", output_step="6h", **options)
    for part in (days, short):
        xr.testing.assert_equal(fine.temperature.sel(prediction_timedelta=part.prediction_timedelta), part.temperature)


def test_a_deep_ensemble_of_24h_members_reports_no_6h_lead(small_world):
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    inits = common.test_inits(xr.open_zarr(small_world / "truth.zarr"), 48, 72, PERIOD)[:1]
    plan = study.deep_ensemble_plan([BUNDLED / "det_24h", BUNDLED / "det_24h"], "cpu", [6, 24, 48], 0, analysis, inits)
    assert plan.leads == [24, 48] and plan.notes  # at 6 h both would be the one borrowed 6 h model


def test_a_recalibrated_scheme_gives_new_units_to_the_systems_that_use_it_only(small_world):
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    inits = common.test_inits(xr.open_zarr(small_world / "truth.zarr"), 48, 72, PERIOD)[:1]
    forecaster = Forecaster.from_pretrained(device="cpu")
    names = ("hybrid", "aleatoric", "deterministic", "epistemic", "ic")

    def keys() -> dict[str, str]:
        return {name: study.engine_plan(name, forecaster, 4, 2, [24], 0, analysis, inits).key for name in names}

    before = keys()
    forecaster.system.settings["schemes"]["sppt"]["amplitude"] *= 2  # the calibration with the posterior
    after = keys()
    assert [name for name in names if after[name] != before[name]] == ["hybrid"]
    forecaster.system.settings["schemes"]["sppt"]["without_posterior"]["amplitude"] *= 2  # SPPT's own, on the deterministic weights
    assert [name for name in names if keys()[name] != after[name]] == ["aleatoric"]
    after = keys()
    forecaster.system.settings.setdefault("schemes", {}).setdefault("none", {})["temperature"] = 2.0
    assert [name for name in names if keys()[name] != after[name]] == ["epistemic"]  # the posterior without a scheme


def test_a_changed_scheme_config_gives_new_units_to_the_systems_that_read_it_only(small_world, tmp_path, monkeypatch):
    analysis = xr.open_zarr(small_world / "analysis.zarr")
    inits = common.test_inits(xr.open_zarr(small_world / "truth.zarr"), 48, 72, PERIOD)[:1]
    forecaster = Forecaster.from_pretrained(device="cpu")
    names = ("hybrid", "aleatoric", "deterministic", "epistemic")
    config = tmp_path / "sppt.yaml"
    config.write_text("activity_cap: 1.0\n")
    for entry in (forecaster.system.settings["schemes"]["sppt"], forecaster.system.settings["schemes"]["sppt"]["without_posterior"]):
        entry["config"] = str(config)

    def keys() -> dict[str, str]:
        return {name: study.engine_plan(name, forecaster, 4, 2, [24], 0, analysis, inits).key for name in names}

    before = keys()
    config.write_text("activity_cap: null\n")  # same name, other content
    assert [name for name in names if keys()[name] != before[name]] == ["hybrid", "aleatoric"]


def test_a_rebundled_posterior_gives_new_units_to_the_posterior_systems_only(small_world, tmp_path):
    import shutil

    analysis = xr.open_zarr(small_world / "analysis.zarr")
    inits = common.test_inits(xr.open_zarr(small_world / "truth.zarr"), 48, 72, PERIOD)[:1]
    names = ("hybrid", "aleatoric", "deterministic", "epistemic", "ic", "hybrid-learned", "persistence", "climatology")

    def keys(root) -> dict[str, str]:
        forecaster = Forecaster.from_pretrained(root, device="cpu")
        return {name: study.engine_plan(name, forecaster, 4, 2, [24], 0, analysis, inits).key for name in names}

    system = tmp_path / "system"
    shutil.copytree(BUNDLED_DIR, system, ignore=shutil.ignore_patterns("diffusion_24h"))
    before = keys(system)
    weights = system / "vi_24h" / "posterior.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(4))  # another posterior (its last ρ rounded), same layout
    assert [name for name in names if keys(system)[name] != before[name]] == ["hybrid", "epistemic", "hybrid-learned"]


def test_paired_differences_match_scipy_paired_t_interval():
    from scipy import stats

    rng = np.random.default_rng(3)
    hybrid, rival = rng.gamma(4.0, 30.0, size=(6, 2)), rng.gamma(4.0, 32.0, size=(6, 2))  # 6 inits × 2 leads

    def units(values: np.ndarray) -> list[dict]:
        return [{"rows": [["z500", lead, "crps", float(v)] for lead, v in zip((24, 48), row, strict=True)]
                 + [["z500", 24, "mse", 1.0]]} for row in values]

    plan = study.Plan("ic", 4, [24, 48], {}, lambda init, scratch: None)
    rows = pd.DataFrame(study.paired_rows(plan, units(rival), units(hybrid))).set_index(["lead_hours", "metric"]).value
    for j, lead in enumerate((24, 48)):
        test = stats.ttest_rel(rival[:, j], hybrid[:, j])
        low, high = test.confidence_interval(0.95)
        np.testing.assert_allclose(rows[lead, "crps_minus_hybrid"], (low + high) / 2, rtol=1e-12)
        np.testing.assert_allclose(rows[lead, "crps_minus_hybrid_ci95"], (high - low) / 2, rtol=1e-10)


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
