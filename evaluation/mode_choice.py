"""Which trained 24 h models to make the bundled posterior's modes: every candidate set scored as a
deterministic multi-model ensemble on the validation period (docs/science.md §4, "Modes").

Each candidate's deterministic forecast runs from the analysis at the calibration's validation inits
(``configs/calibrate_ensemble_lead.yaml``: 8 inits 10 days apart) to 10 days; a set of candidates is
scored as an ensemble of its members (fair CRPS, ensemble-mean RMSE; latitude-weighted over inits
and area) for Z500 and T850. Only models of one token order can share a posterior, so the sets are
of the Pangu-order models; the legacy bundled ``det_24h`` is scored alone and in the study's deep
ensemble for comparison. Writes ``results/mode_choice.json``.

    python evaluation/mode_choice.py [--candidate NAME=CKPT ...] [--out evaluation/results/mode_choice.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import xarray as xr

from bdlens.checkpoint import bundled_checkpoint
from bdlens.configs import config_path, portable_path
from bdlens.ensemble.rollout import deterministic_forecast
from bdlens.metrics import crps, ensemble_mean_rmse
from bdlens.models.pretrained import load_trained
from bdlens.training.calibration import EnsembleCalibrationConfig, validation_inits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_world_split, field, load_demo_world, verification  # noqa: E402

HERE = Path(__file__).resolve().parent
CANDIDATES = {f"seed{s}": HERE / "deep_ensemble" / f"det_24h_seed{s}" for s in (1, 2, 3)}
LEADS = (24, 72, 120, 240)
DIMS = ["time", "latitude", "longitude"]


def scores(members: list[xr.Dataset], truth: xr.Dataset) -> dict[str, dict[str, list[float]]]:
    """Fair CRPS (one member: the CRPS, its absolute error) and ensemble-mean RMSE per lead of the deterministic
    forecasts ``members`` as one ensemble."""
    ensemble = xr.concat(members, dim="number")
    valid = verification(truth, members[0])
    return {key: {"crps": crps(field(ensemble, key), field(valid, key), dims=DIMS, fair=len(members) > 1).values.round(4).tolist(),
                  "rmse": ensemble_mean_rmse(field(ensemble, key), field(valid, key), dims=DIMS).values.round(3).tolist()}
            for key in ("z500", "t850")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", nargs="*", default=[], metavar="NAME=CKPT", help="further Pangu-order 24 h checkpoints")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mode_choice.json")
    args = parser.parse_args(argv)
    candidates = dict(CANDIDATES) | {k: Path(v) for k, v in (c.split("=", 1) for c in args.candidate)}
    truth, analysis = load_demo_world()
    config = EnsembleCalibrationConfig.from_yaml(config_path("calibrate_ensemble_lead"))
    inits = validation_inits(truth, config, demo_world_split("val"))
    forecasts = {name: deterministic_forecast({24: load_trained(path)}, analysis, inits, list(LEADS)) for name, path in candidates.items()}
    legacy = deterministic_forecast({24: load_trained(bundled_checkpoint("det_24h"))}, analysis, inits, list(LEADS))
    sets = [combo for size in range(1, len(candidates) + 1) for combo in itertools.combinations(sorted(candidates), size)]
    result = {
        "inits": [str(t)[:13] for t in inits], "lead_hours": list(LEADS), "candidates": {k: portable_path(v) for k, v in candidates.items()},
        "sets": {"+".join(combo): scores([forecasts[c] for c in combo], truth) for combo in sets},
        "legacy det_24h": scores([legacy], truth),
        "study deep ensemble (det_24h + seeds 1-3)": scores([legacy, *(forecasts[f"seed{s}"] for s in (1, 2, 3))], truth),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, by_field in [*result["sets"].items(), ("legacy det_24h", result["legacy det_24h"])]:
        print(f"{name:28s} Z500 CRPS {by_field['z500']['crps']}  T850 CRPS {by_field['t850']['crps']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
