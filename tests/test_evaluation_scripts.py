"""Evaluation scripts' own logic: ensemble_skill.py's --update (rows of the systems run now replace only
theirs) and their refusals of bad input before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
import ensemble_skill  # noqa: E402
import temperature_sweep  # noqa: E402


def _rows(system: str, value: float) -> pd.DataFrame:
    return pd.DataFrame({"system": system, "field": ["z500", "t850"], "lead_hours": [24, 24], "metric": "crps", "value": value})


def test_update_replaces_only_the_systems_run_now() -> None:
    kept = pd.concat([_rows("hybrid", 1.0), _rows("epistemic", 2.0), _rows("aleatoric", 3.0)], ignore_index=True)
    table = ensemble_skill.updated(kept, pd.concat([_rows("hybrid", 5.0), _rows("ic", 6.0)], ignore_index=True))
    by_system = table.groupby("system").value.agg(list).to_dict()
    assert by_system == {"hybrid": [5.0, 5.0], "epistemic": [2.0, 2.0], "aleatoric": [3.0, 3.0], "ic": [6.0, 6.0]}


def test_update_without_an_existing_csv_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    assert ensemble_skill.main(["--systems", "--update", "--out", str(tmp_path / "absent.csv")]) == 2
    err = capsys.readouterr().err
    assert "--update needs an existing --out CSV" in err and err.count("\n") == 1


def test_split_inits_come_from_the_chosen_split_with_the_lead_inside_it() -> None:
    times = pd.date_range("2002-01-01", "2002-12-31T18", freq="6h").values
    truth = xr.Dataset(coords={"time": times})
    for split, (start, end) in (("val", ("2002-01-01", "2002-06-30")), ("test", ("2002-07-01", "2002-12-31"))):
        inits = ensemble_skill.split_inits(truth, split, "10d", 5, 100)
        assert inits[0] == np.datetime64(start) + np.timedelta64(1, "D")  # a day of history
        assert (np.diff(inits) == np.timedelta64(5, "D")).all()
        assert inits[-1] + np.timedelta64(10, "D") <= np.datetime64(end) + np.timedelta64(18, "h")
        assert inits[-1] + np.timedelta64(15, "D") > np.datetime64(end) + np.timedelta64(18, "h")  # none left out
    assert len(ensemble_skill.split_inits(truth, "val", "36h", 10, 3)) == 3


def test_temperature_sweep_refuses_a_negative_temperature_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.json"
    assert temperature_sweep.main(["--temperatures", "1", "-0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--temperatures must be >= 0" in err and err.count("\n") == 1 and not out.exists()


def test_mode_choice_scores_a_set_of_models_as_one_ensemble() -> None:
    """mode_choice.scores: fair CRPS and ensemble-mean RMSE of deterministic forecasts taken as members,
    against a brute-force reference (numpy, written out) on random fields."""
    import mode_choice

    from bdlens.grid import lat_weights

    g = np.random.default_rng(0)
    times = np.array(["2002-01-05T00", "2002-01-15T00"], dtype="datetime64[ns]")
    leads = np.array([24, 72], dtype="timedelta64[h]").astype("timedelta64[ns]")
    lat, lon, levels = np.linspace(-80, 80, 6), np.arange(8) * 45.0, [500, 850]
    valid = np.unique((times[:, None] + leads[None]).ravel())

    def state(shape_lead: tuple[int, ...], dims: tuple[str, ...], coords: dict) -> xr.Dataset:
        upper = ("level",) + ("latitude", "longitude")
        return xr.Dataset({name: (dims[:-2] + (upper if name in ("geopotential", "temperature", "u_component_of_wind") else ("latitude", "longitude")),
                                  g.normal(size=shape_lead + ((2,) if name != "mean_sea_level_pressure" else ()) + (6, 8)))
                           for name in ("geopotential", "temperature", "u_component_of_wind", "mean_sea_level_pressure")},
                          coords={**coords, "level": levels, "latitude": lat, "longitude": lon})

    truth = state((len(valid),), ("time", "latitude", "longitude"), {"time": valid})
    members = [state((2, 2), ("time", "prediction_timedelta", "latitude", "longitude"), {"time": times, "prediction_timedelta": leads})
               for _ in range(3)]
    got = mode_choice.scores(members, truth)
    w = lat_weights(lat)[:, None] / lat_weights(lat).mean()
    for key, (name, level) in (("z500", ("geopotential", 500)), ("t850", ("temperature", 850))):
        x = np.stack([m[name].sel(level=level).values for m in members])  # (M, time, lead, lat, lon)
        y = np.stack([[truth[name].sel(level=level, time=t + lead).values for lead in leads] for t in times])
        m = len(members)
        fair = np.abs(x - y).mean(0) - np.abs(x[:, None] - x[None]).sum((0, 1)) / (2 * m * (m - 1))
        np.testing.assert_allclose(got[key]["crps"], (fair * w).mean((0, 2, 3)), atol=1e-4)
        np.testing.assert_allclose(got[key]["rmse"], np.sqrt(((x.mean(0) - y) ** 2 * w).mean((0, 2, 3))), atol=1e-3)


def test_realization_tells_the_bundled_analyses_world_from_another_realization(tmp_path: Path, small_world: Path) -> None:
    """A world whose analyses at the bundled times are the bundled ones is the reference (None); one
    that differs anywhere gets a fingerprint, the same for the same values; a world without those
    times (the small world) cannot be told and counts as the reference."""
    import common

    from bdlens.data import open_dataset
    from bdlens.data.export import BUNDLED_ANALYSIS

    bundled = open_dataset(BUNDLED_ANALYSIS, sparse_times=True).load()
    for variable in bundled.variables.values():
        variable.encoding = {}  # the bundled store's codecs are not for a new store
    same, other = tmp_path / "same", tmp_path / "other"
    bundled.to_zarr(same / "analysis.zarr")
    changed = bundled.copy(deep=True)
    changed["temperature"][{"time": -1, "level": 0, "latitude": 0, "longitude": 0}] += 1e-3
    changed.to_zarr(other / "analysis.zarr")
    assert common.realization(same) is None
    fingerprint = common.realization(other)
    assert fingerprint is not None and len(fingerprint) == 12 and common.realization(other) == fingerprint
    assert common.realization(small_world) is None


def test_vi_variants_each_change_one_setting_of_the_bundled_vi_config() -> None:
    """evaluation/vi_variants.py's posteriors differ from the bundled vi_24h's config in what their names say, and only there."""
    import vi_variants

    from bdlens.configs import config_path
    from bdlens.training.vi import VIConfig

    def loaded(name: str) -> dict:
        path = vi_variants.ROOT / name if name.endswith(".yaml") else config_path(name)
        return VIConfig.from_yaml(path).model_dump()

    reference = loaded(vi_variants.VARIANTS["reference"])
    assert reference["posterior"]["prior_sigma"] == 1e-2 and reference["posterior"]["parameters"] == "all"
    expected = {"prior_narrow": {("posterior", "prior_sigma"): 1e-3}, "prior_wide": {("posterior", "prior_sigma"): 1e-1},
                "last_stages": {("posterior", "parameters"): "last_stages"}}
    for name, change in expected.items():
        variant = loaded(vi_variants.VARIANTS[name])
        differ = {(section, key): variant[section][key] for section in reference for key in reference[section]
                  if variant[section][key] != reference[section][key]}
        assert differ == change, name


def test_vi_variants_tabulates_z500_and_t850_by_lead() -> None:
    import vi_variants

    rows = [{"system": "s", "field": f, "lead_hours": h, "metric": m, "value": v}
            for f, v0 in (("z500", 100.0), ("t850", 1.0), ("u850", 5.0)) for h in (48, 24) for m, v in (("crps", v0 * h), ("activity", 1.0))]
    rows.append({"system": "s", "field": "all", "lead_hours": -1, "metric": "out_of_bounds_count", "value": 0.0})
    assert vi_variants.by_lead(rows) == {"t850": {"crps": [24.0, 48.0]}, "z500": {"crps": [2400.0, 4800.0]}}


def test_vi_variants_refuses_a_file_as_runs_folder_before_any_work(tmp_path: Path, capsys) -> None:
    import vi_variants

    runs, out = tmp_path / "runs.txt", tmp_path / "out.json"
    runs.write_text("mine")
    assert vi_variants.main(["--runs", str(runs), "--out", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err and runs.read_text() == "mine" and not out.exists()
