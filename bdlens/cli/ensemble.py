"""``bdlens ensemble``: run a hybrid (or any other) ensemble and write it as a forecast zarr."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bdlens.cli.options import add_device
from bdlens.ensemble.schemes import SCHEMES
from bdlens.errors import BdlensError

PERTURBATIONS = ("default", *sorted(SCHEMES), "none")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ensemble`` sub-command."""
    parser = subparsers.add_parser(
        "ensemble",
        help="run an ensemble (posterior weight samples x perturbation draws) and write a forecast zarr",
        description=(
            "Forecast an ensemble of MEMBERS = K posterior weight samples x J perturbation draws from analyses, "
            "write it to a WB2-layout zarr (dims number, time, prediction_timedelta, [level], latitude, longitude; "
            "coordinates weight_sample and perturbation_draw on number), with the epistemic / aleatoric variance "
            "decomposition in its 'decomposition' group, and print a summary per lead. With no options it runs the "
            "bundled demo models on the bundled demo analyses. Several processes: torchrun --nproc_per_node N -m bdlens ensemble ..."
        ),
    )
    parser.add_argument("--members", type=int, default=100, help="ensemble members M = K x J (default: 100)")
    parser.add_argument("--weights", type=int, metavar="K",
                        help="posterior weight samples K (must divide --members; default: the system's calibrated choice)")
    parser.add_argument("--lead", default="10d", help="longest lead, e.g. 10d or 72h (default: 10d)")
    parser.add_argument("--output-step", default="24h", help="lead spacing of the output, e.g. 6h or 24h (default: 24h)")
    parser.add_argument("--init", nargs="+", metavar="TIME",
                        help="init time(s), ISO (2002-07-01T00) or START/END/STEP ranges (default: the latest analysis time of the data)")
    parser.add_argument("--data", type=Path,
                        help="WB2/ERA5-layout zarr or netCDF with the analyses (default: the bundled demo analyses)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint, a bundle or a folder of checkpoints (default: the bundled demo models)")
    parser.add_argument("--perturbation", choices=PERTURBATIONS, default="default",
                        help="aleatoric scheme: learned network, SPPT, initial-condition fields or none "
                             "(default: the system's calibrated choice)")
    parser.add_argument("--model", choices=("hybrid", "diffusion", "persistence", "climatology"), default="hybrid",
                        help="hybrid: posterior (or --no-bayes deterministic) weights x --perturbation; diffusion: the EDM "
                             "baseline of a diffusion checkpoint (--checkpoint); persistence and climatology (past trajectories "
                             "of --data's training years, same season and hour): the references (default: hybrid)")
    parser.add_argument("--no-bayes", action="store_true", help="deterministic weights (K = 1): the aleatoric-only system")
    parser.add_argument("--temperature", type=float, help="posterior temperature (default: the calibration's)")
    parser.add_argument("--amplitude", type=float, help="perturbation amplitude (default: the calibration's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("ensemble.zarr"), help="output zarr (default: ./ensemble.zarr)")
    parser.add_argument("--batch-size", default="auto",
                        help="members computed at once: 'auto' (fits a quarter of the free memory) or N (default: auto)")
    add_device(parser, default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same options)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a bdlens forecast")
    parser.set_defaults(func=run)

    cal = subparsers.add_parser(
        "calibrate",
        help="tune a scheme's amplitude and the posterior temperature on ensembles from analyses (every step model)",
        description=(
            "Run the system's ensembles from the analysis at validation-period inits of a world, verify them against "
            "its truth and search the perturbation amplitude (and posterior temperature) minimising "
            "CRPS * (1 + penalty * ln^2 SSR). Writes OUT/ensemble.json; copy it beside the checkpoints to use it."
        ),
    )
    cal.add_argument("--perturbation", choices=PERTURBATIONS[1:], required=True, help="the scheme to calibrate")
    cal.add_argument("--checkpoint", type=Path, help="the system (default: the bundled demo models)")
    cal.add_argument("--world", type=Path, help="world directory (default: the default demo world, built or reused)")
    cal.add_argument("--config", default="calibrate_ensemble_demo", help="YAML (path or name in configs/)")
    cal.add_argument("--default", action="store_true", help="also make this scheme the system's default perturbation")
    cal.add_argument("--no-bayes", action="store_true", help="calibrate the scheme on the deterministic weights (the aleatoric-only "
                     "system), stored apart from its calibration with the posterior (docs/ensemble.md)")
    cal.add_argument("--out", type=Path, required=True, help="directory for ensemble.json")
    cal.add_argument("--overwrite", action="store_true", help="replace OUT/ensemble.json if it exists")
    cal.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    cal.set_defaults(func=run_calibration)


def run(args: argparse.Namespace) -> int:
    """Run the ensemble and print the per-lead summary."""

    from bdlens.cli.options import set_threads
    from bdlens.ensemble.engine import Forecaster
    from bdlens.ensemble.summary import summary_table

    set_threads(args.threads)
    if args.members < 1:
        raise BdlensError(f"--members must be at least 1, got {args.members}")
    forecaster = Forecaster.from_pretrained(args.checkpoint, device=args.device)
    try:
        forecast = forecaster.ensemble(
            init=args.init, members=args.members, weights=args.weights, lead=args.lead, output_step=args.output_step,
            perturbation=None if args.perturbation == "default" and args.model == "hybrid" else (
                "none" if args.perturbation == "default" else args.perturbation), bayes=not args.no_bayes,
            seed=args.seed, data=args.data, out=args.out, batch_size=args.batch_size, resume=args.resume,
            overwrite=args.overwrite, temperature=args.temperature, amplitude=args.amplitude,
            command=shlex.join(["bdlens", *sys.argv[1:]]), model=args.model,
        )
    except KeyboardInterrupt:
        print(f"bdlens ensemble: interrupted; continue with the same command and --resume (output {args.out})", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {forecast.sizes['number']} members x {forecast.sizes['time']} init(s) x "
              f"{forecast.sizes['prediction_timedelta']} leads to {args.out}")
        print(summary_table(args.out))
    return 0


def run_calibration(args: argparse.Namespace) -> int:
    """Calibrate one scheme of a system on the validation period of a world."""
    import json

    from bdlens.checkpoint import BUNDLED_DIR
    from bdlens.cli.options import set_threads
    from bdlens.configs import config_path
    from bdlens.data import open_dataset
    from bdlens.data.splits import load_data_config
    from bdlens.ensemble.engine import Forecaster
    from bdlens.ensemble.system import SYSTEM_FILE
    from bdlens.outputs import prepare_output
    from bdlens.training.calibration import (
        CALIBRATION_KIND,
        EnsembleCalibrationConfig,
        calibrate_system,
        validation_inits,
        write_system_file,
    )
    from bdlens.world.build import build

    if args.no_bayes and args.perturbation == "none":
        raise BdlensError("--no-bayes with --perturbation none leaves nothing to calibrate; name a scheme")
    set_threads(args.threads)
    config_file = config_path(args.config)
    config = EnsembleCalibrationConfig.from_yaml(config_file)
    system_dir = args.checkpoint or BUNDLED_DIR
    # The system's own ensemble.json is an input: the result goes elsewhere and is copied in by hand.
    prepare_output(args.out, CALIBRATION_KIND, args.overwrite, inputs=[system_dir, args.world, config_file],
                   layout=(SYSTEM_FILE,), required=(SYSTEM_FILE,))
    forecaster = Forecaster.from_pretrained(args.checkpoint)
    world = args.world or build()
    truth, analysis = open_dataset(world / "truth.zarr").load(), open_dataset(world / "analysis.zarr").load()
    inits = validation_inits(truth, config, load_data_config(config_path("data_demo")).splits["val"].bounds)
    record = calibrate_system(forecaster, args.perturbation, analysis, truth, inits, config, bayes=not args.no_bayes)
    record["command"] = shlex.join(["bdlens", *sys.argv[1:]])
    record["config"] = config.model_dump(mode="json")
    path = write_system_file(args.out, args.perturbation, record, forecaster.system.settings, args.default, bayes=not args.no_bayes)
    print(json.dumps({k: record[k] for k in ("amplitude", "temperature", "before", "after")}, indent=1, default=float))
    print(f"wrote {path}")
    return 0
