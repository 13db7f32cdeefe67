"""Evaluation scripts' own logic: ensemble_skill.py's --update (rows of the systems run now replace only
theirs) and their refusals of bad input before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

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


def test_temperature_sweep_refuses_a_negative_temperature_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.json"
    assert temperature_sweep.main(["--temperatures", "1", "-0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--temperatures must be >= 0" in err and err.count("\n") == 1 and not out.exists()
