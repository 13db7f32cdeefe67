"""Skill of the deterministic demo models on the demo world's test period (issue: backbone).

Forecasts start from the *analysis* at 00 UTC each test day and are verified against the *truth*;
6 h and 24 h models are composed by hierarchical temporal aggregation. Baselines: persistence of the
analysis and the climatology (time mean of the training years; Held–Suarez has no seasons).
Prints latitude-weighted RMSE of Z500 and T850 (and more) per lead and writes a JSON table.

    python evaluation/deterministic_skill.py [--det-6h DIR] [--det-24h DIR] [--out evaluation/results/deterministic_skill.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from bdlens.checkpoint import bundled_checkpoint
from bdlens.ensemble.rollout import deterministic_forecast
from bdlens.models.pretrained import load_trained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIELDS, demo_world_split, load_demo_world, print_table, rmse_by_lead, test_inits, verification  # noqa: E402


def skill_table(forecast: xr.Dataset, truth: xr.Dataset, analysis: xr.Dataset, climatology: xr.Dataset) -> dict[str, dict[str, list[float]]]:
    """Latitude-weighted RMSE per lead of the forecast, persistence of the analysis and ``climatology``
    (a time-mean state), for every headline field: ``table[field][series]`` = one value per lead."""
    truth_valid = verification(truth, forecast)

    def like_forecast(state: xr.Dataset) -> xr.Dataset:
        # Variable by variable: broadcasting the whole Dataset would give MSLP the upper-air `level` dim.
        return xr.Dataset({name: state[name].broadcast_like(forecast[name]) for name in forecast.data_vars})

    series = (("model", forecast), ("persistence", like_forecast(analysis.sel(time=forecast.time))), ("climatology", like_forecast(climatology)))
    return {key: {name: rmse_by_lead(fc, truth_valid, key) for name, fc in series} for key in FIELDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--det-6h", type=Path, default=None, help="6 h checkpoint (default: bundled det_6h)")
    parser.add_argument("--det-24h", type=Path, default=None, help="24 h checkpoint (default: bundled det_24h)")
    parser.add_argument("--max-lead-hours", type=int, default=240)
    parser.add_argument("--init-every-hours", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/deterministic_skill.json"))
    args = parser.parse_args(argv)

    models = {
        6: load_trained(args.det_6h or bundled_checkpoint("det_6h")),
        24: load_trained(args.det_24h or bundled_checkpoint("det_24h")),
    }
    truth, analysis = load_demo_world()
    lead_hours = list(range(6, args.max_lead_hours + 1, 6))
    inits = test_inits(truth, args.max_lead_hours, args.init_every_hours)
    forecast = deterministic_forecast(models, analysis, inits, lead_hours)
    table = skill_table(forecast, truth, analysis, truth.sel(time=slice(*demo_world_split("train"))).mean("time"))
    result = {
        "inits": [str(inits[0])[:13], str(inits[-1])[:13], len(inits)],
        "lead_hours": lead_hours,
        "rmse": table,
        "models": {str(s): str(m.source) for s, m in models.items()},
    }
    checks = {}
    for key in ("z500", "t850"):
        rmse = {k: np.asarray(v) for k, v in table[key].items()}
        beats_persistence = bool(np.all(rmse["model"] < rmse["persistence"]))
        three_days = np.asarray(lead_hours) <= 72
        beats_climatology_3d = bool(np.all(rmse["model"][three_days] < rmse["climatology"][three_days]))
        crossover = next((h for h, m, c in zip(lead_hours, rmse["model"], rmse["climatology"]) if m >= c), None)
        checks[key] = {"beats_persistence_6h_to_10d": beats_persistence, "beats_climatology_to_3d": beats_climatology_3d, "climatology_crossover_hours": crossover}
    result["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"test inits {result['inits'][0]} … {result['inits'][1]} ({len(inits)}), latitude-weighted RMSE")
    columns = [(f, s, f"{f.upper()} {s}") for f in ("z500", "t850") for s in ("model", "persistence", "climatology")]
    print_table(table, lead_hours, {6, 12, 24, 48, 72, 120, 168, 240, lead_hours[-1]}, columns)
    print(json.dumps(checks, indent=1))
    ok = all(c["beats_persistence_6h_to_10d"] and c["beats_climatology_to_3d"] for c in checks.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
