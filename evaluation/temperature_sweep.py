"""What the posterior temperature does to the calibrated hybrid (issue: skilful, calibrated default).

The system (default: the bundled one, with its SPPT amplitude and per-lead factors) runs from the
analysis at the validation inits of a calibration config (default ``calibrate_ensemble_lead``: the
inits, members, K, seed and fields its per-lead factors were fitted on, to its ``per_lead.lead``) at
each posterior temperature T of ``--temperatures``; T = 0 is the aleatoric-only system (the
deterministic weights, K = 1, the same number of members). Each run is scored as ``bdlens
calibrate`` scores it (``bdlens.training.calibration.ensemble_scores``: fair CRPS in units of each
field's climatological std and the corrected spread-skill ratio, pooled over the fields, per lead),
so T = 1 reproduces the calibration record. Validation data only: this decides, it does not report
test skill. Writes JSON (T → scores) and a table on stdout.

    python evaluation/temperature_sweep.py [--temperatures 0 0.25 0.5 1 2] [--config calibrate_ensemble_lead]
        [--checkpoint DIR] [--out evaluation/results/temperature_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bdlens import Forecaster
from bdlens.configs import config_path
from bdlens.errors import BdlensError
from bdlens.training.calibration import EnsembleCalibrationConfig, ensemble_scores, field_scales, validation_inits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_world_split, load_demo_world  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--config", default="calibrate_ensemble_lead", help="calibration config (path or name in configs/)")
    parser.add_argument("--checkpoint", type=Path, help="the system (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/temperature_sweep.json"))
    args = parser.parse_args(argv)
    try:  # a wrong --config, --checkpoint or temperature is found before the world is loaded
        if min(args.temperatures) < 0:
            raise BdlensError(f"--temperatures must be >= 0 (0: no weight sampling), got {min(args.temperatures)}")
        config = EnsembleCalibrationConfig.from_yaml(config_path(args.config))
        forecaster = Forecaster.from_pretrained(args.checkpoint)
    except BdlensError as err:
        print(f"temperature_sweep: error: {err}", file=sys.stderr)
        return 2
    lead = config.per_lead.lead if config.per_lead.tune else config.lead
    truth, analysis = load_demo_world()
    inits = validation_inits(truth, config, demo_world_split("val"))
    scale = field_scales(truth, config.fields)
    results = {}
    for t in args.temperatures:
        bayes = t > 0
        forecast = forecaster.ensemble(init=[str(i) for i in inits], members=config.members, weights=config.weights if bayes else None,
                                       lead=lead, output_step=config.output_step, perturbation="sppt", seed=config.seed, data=analysis,
                                       bayes=bayes, temperature=t if bayes else None)
        results[f"{t:g}"] = {"system": forecast.attrs["system"], **ensemble_scores(forecast, truth, scale, config.fields)}
        r = results[f"{t:g}"]
        print(f"T = {t:g}: CRPS {r['crps']:.5f}, spread-skill {r['spread_skill']:.3f}; by lead "
              + " ".join(f"{c:.4f}/{s:.2f}" for c, s in zip(r["crps_by_lead"], r["spread_skill_by_lead"], strict=True)), flush=True)
    record = {"command": " ".join(["python", "evaluation/temperature_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": config.model_dump(mode="json"), "lead": lead, "inits": [str(i) for i in inits], "by_temperature": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
