"""Skill and calibration of ensemble systems on the default demo world (issue: skilful, calibrated default).

Every system runs through the ensemble engine (`bdlens.Forecaster`) from the analysis at test-period
inits and is verified against the truth: fair CRPS, ensemble-mean RMSE and the corrected
spread-skill ratio per lead (latitude-weighted, averaged over inits and space) and the members'
activity (rms anomaly from the climatology over the truth's), for Z500, T850, U850 and MSLP, plus the members that left physical bounds and the cost per member-step. The
references (``persistence``, ``climatology``, ``ic``, ``bred``) and the ``diffusion`` baseline run
through the same engine (``--diffusion``: a diffusion checkpoint other than the bundled one;
``--checkpoint``: a system other than the bundled one, e.g. with another calibration). With
``--physics`` (a `bdlens world ensemble` store at the same inits) the physics ensemble is scored
alike. Results go to a CSV (one row per system, field, lead, metric) and a table on stdout.

    python evaluation/ensemble_skill.py [--systems hybrid epistemic aleatoric deterministic ...] [--inits 10]
        [--every-days 10] [--split test] [--members 16] [--lead 10d] [--physics PHYS.zarr] [--diffusion CKPT] [--checkpoint DIR]
        [--out evaluation/results/ensemble_skill.csv] [--update]

``--update`` replaces in an existing ``--out`` only the rows of the systems run now and keeps the
others: every member's random stream is keyed by (seed, stream, init, member, step), so a system's
rows do not depend on which other systems ran beside it (a recalibrated scheme reruns only its systems).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from bdlens import Forecaster
from bdlens.data import open_dataset
from bdlens.ensemble.engine import parse_hours
from bdlens.errors import BdlensError
from bdlens.metrics import activity_ratio, crps, ensemble_mean_rmse, spread_skill_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIELDS, demo_world_split, field, lead_rows, load_demo_world, test_inits, verification  # noqa: E402

# name → Forecaster.ensemble options (members and weights are set from --members).
SYSTEMS = {
    "deterministic": {"bayes": False, "perturbation": "none", "members": 1},
    "epistemic": {"bayes": True, "perturbation": "none"},
    "aleatoric": {"bayes": False, "perturbation": "sppt"},
    "hybrid": {"bayes": True, "perturbation": "sppt"},
    "hybrid-learned": {"bayes": True, "perturbation": "learned", "output_step": "24h"},
    "ic": {"bayes": False, "perturbation": "ic"},
    "bred": {"bayes": False, "perturbation": "bred"},
    "persistence": {"model": "persistence", "members": 1},
    "climatology": {"model": "climatology"},
    "diffusion": {"model": "diffusion"},
}
DIMS = ["time", "latitude", "longitude"]


def engine_options(name: str, members: int, weights: int | None, lead: str, output_step: str = "24h") -> dict:
    """Forecaster.ensemble options of system ``name``: ``weights`` is K of the hybrids (None: the
    system's default); epistemic-only runs K = members (one draw each)."""
    options = {"members": members, "lead": lead, "output_step": output_step, **SYSTEMS[name]}
    if options.get("bayes") is True:
        options["weights"] = options["members"] if options["perturbation"] == "none" else weights
    return options


def scores(name: str, forecast: xr.Dataset, truth: xr.Dataset) -> list[dict]:
    """Rows (system, field, lead_hours, metric, value) of one forecast."""
    valid = verification(truth, forecast)
    rows = []
    members = forecast.sizes.get("number", 1)
    for key in FIELDS:
        fc, tr = field(forecast, key), field(valid, key)
        # The demo world has no seasons: its climatology is the truth's time mean at every point.
        metrics = {"rmse": ensemble_mean_rmse(fc, tr, dims=DIMS), "activity": activity_ratio(fc, tr, field(truth, key).mean("time"), dims=DIMS)}
        if members >= 2:
            metrics["crps"] = crps(fc, tr, dims=DIMS)
            metrics["spread_skill"] = spread_skill_ratio(fc, tr, dims=DIMS)
        for metric, values in metrics.items():
            rows += lead_rows(name, key, metric, values)
    for attr in ("wall_seconds_per_member_step", "network_evaluations_per_member_step", "out_of_bounds_count"):
        if attr in forecast.attrs:
            rows.append({"system": name, "field": "all", "lead_hours": -1, "metric": attr, "value": float(forecast.attrs[attr])})
    return rows


def updated(kept: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``kept``'s rows of the systems absent from ``new``, then ``new`` (both tidy: system, field, lead_hours, metric, value)."""
    return pd.concat([kept[~kept.system.isin(new.system.unique())], new], ignore_index=True)


def split_inits(truth: xr.Dataset, split: str, lead: str, every_days: int, count: int) -> np.ndarray:
    """The first ``count`` inits of the demo world's ``split`` ("val" or "test") every ``every_days``,
    each with a day of history and ``lead`` ("10d", "36h") of truth after it inside the split."""
    return test_inits(truth, parse_hours(lead, "lead"), 24 * every_days, demo_world_split(split))[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="*", default=["deterministic", "epistemic", "aleatoric", "hybrid"], choices=sorted(SYSTEMS),
                        help="systems run through the engine (none: score only --physics)")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--weights", type=int, default=4, help="K for the hybrid systems (epistemic-only uses K = members)")
    parser.add_argument("--inits", type=int, default=10)
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the period the inits come from (val: to decide a calibration, test: to report it)")
    parser.add_argument("--every-days", type=int, default=10)
    parser.add_argument("--lead", default="10d")
    parser.add_argument("--physics", type=Path, help="a `bdlens world ensemble` store at the same inits")
    parser.add_argument("--diffusion", type=Path, help="diffusion checkpoint (default: the bundled system's)")
    parser.add_argument("--checkpoint", type=Path, help="the system (a bundle or a folder of checkpoints; default: the bundled one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/ensemble_skill.csv"))
    parser.add_argument("--update", action="store_true", help="keep the rows of --out for the systems not run now")
    args = parser.parse_args(argv)
    if args.update and not args.out.is_file():
        print(f"ensemble_skill: error: --update needs an existing --out CSV, {args.out} is not one; drop --update to write it", file=sys.stderr)
        return 2

    try:  # a wrong --checkpoint is found before the world is loaded
        forecaster = Forecaster.from_pretrained(args.checkpoint)
    except BdlensError as err:
        print(f"ensemble_skill: error: {err}", file=sys.stderr)
        return 2
    truth, analysis = load_demo_world()
    inits = split_inits(truth, args.split, args.lead, args.every_days, args.inits)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.systems:
            options = engine_options(name, args.members, args.weights, args.lead)
            runner = Forecaster.from_pretrained(args.diffusion) if name == "diffusion" and args.diffusion else forecaster
            forecast = runner.ensemble(init=[str(t) for t in inits], seed=args.seed, data=analysis,
                                       out=Path(tmp) / f"{name}.zarr", **options)
            rows += scores(name, forecast, truth)
            print(f"{name}: {forecast.attrs['system']}", flush=True)
    if args.physics is not None:
        physics = open_dataset(args.physics)  # the canonical reader: coordinates exactly those of the truth
        rows += scores("physics", physics.sel(time=physics.time.isin(inits)), truth)
    table = pd.DataFrame(rows)
    if args.update:
        table = updated(pd.read_csv(args.out), table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    for key in ("z500", "t850"):
        sub = table[(table.field == key) & (table.lead_hours > 0)]
        pivot = sub.pivot_table(index=["system", "metric"], columns="lead_hours", values="value")
        print(f"\n{key}\n" + pivot.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
