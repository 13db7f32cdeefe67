"""``bdlens train perturb`` (the learned perturbation network) and ``bdlens calibrate`` (docs/science.md §5).

Both start from a VI posterior checkpoint (``bdlens train vi``); the data, normalisation statistics
and world come from its manifest, so everything is trained and tuned on the data the backbone saw.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from bdlens.cli.options import add_data_options, add_device, add_run_mode, set_threads, with_device


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the top-level ``calibrate`` command."""
    cal = subparsers.add_parser(
        "calibrate",
        help="tune the perturbation amplitude (and posterior temperature) on the validation period",
        description="Minimise the fair CRPS with the corrected spread-skill ratio near 1 over the perturbation amplitude "
        "(learned σ multiplier or SPPT pattern σ scale) and optionally the posterior temperature, on the validation split. "
        "Writes OUT/calibration.json (and, for SPPT, OUT/perturbation_sppt_calibrated.yaml); with --beside-checkpoint also a "
        "copy beside the calibrated checkpoint's manifest, where forecasts read it from.",
    )
    cal.add_argument("--vi", type=Path, required=True, help="VI posterior checkpoint directory (bdlens train vi)")
    method = cal.add_mutually_exclusive_group()
    method.add_argument("--perturb", type=Path, help="learned perturbation checkpoint directory (bdlens train perturb)")
    method.add_argument("--sppt", help="SPPT config (path or name in configs/), e.g. perturbation_sppt")
    cal.add_argument("--config", required=True, help="calibration YAML (path or name in configs/), e.g. calibrate_demo")
    cal.add_argument("--out", type=Path, required=True, help="output directory (calibration.json); not one of the inputs")
    cal.add_argument("--beside-checkpoint", action="store_true",
                     help="also write calibration.json beside the calibrated checkpoint (--perturb, else --vi); never into the installed package")
    cal.add_argument("--overwrite", action="store_true", help="replace a calibration written by bdlens in --out (and, with --beside-checkpoint, beside the checkpoint)")
    add_data_options(cal, trained_on="posterior")
    cal.set_defaults(func=_calibrate)


def register_perturb(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``perturb`` to the sub-commands of ``bdlens train``."""
    p = train_subparsers.add_parser(
        "perturb",
        help="train the learned (μ, σ) perturbation network with fair CRPS on a frozen VI posterior",
        description="Train a small 3DEST that perturbs the latest input state at every step (docs/science.md §5), with fair CRPS over "
        "M members, the backbone frozen and an autoregressive curriculum. Writes OUT/metrics.jsonl, OUT/state.pt and "
        "OUT/checkpoint. Data-parallel under torchrun: `torchrun --nproc_per_node N -m bdlens train perturb ...`.",
    )
    p.add_argument("--from", dest="source", type=Path, required=True, help="VI posterior checkpoint directory (bdlens train vi)")
    p.add_argument("--config", required=True, help="perturbation YAML (path or name in configs/), e.g. perturb_demo")
    p.add_argument("--out", type=Path, required=True, help="run directory (state, metrics log, checkpoint/)")
    add_data_options(p, trained_on="posterior")
    add_device(p, default=None)
    add_run_mode(p)
    p.set_defaults(func=_train_perturb)


def _posterior_and_data(source: Path, world: str | None, splits: list[str]) -> tuple[Any, dict, dict, Path]:
    """The VI posterior, its manifest, its datasets for ``splits`` and the data path, cross-checked."""
    from bdlens.bayes.posterior import load_posterior
    from bdlens.data import checkpoint_datasets

    bayes, manifest = load_posterior(source)
    sets, _, data_path = checkpoint_datasets(manifest, source, world, splits, made_by="bdlens train vi")
    return bayes, manifest, sets, data_path


def _world_path(world: str | None) -> str | None:
    """``--world`` when it is a path (an input that an output must not overlap), None for the demo names."""
    return None if world in (None, "demo", "small") else world


def _provenance(source: Path, config_file: Path, data_path: Path) -> dict[str, Any]:
    from bdlens.configs import portable_path

    return {"command": shlex.join(["bdlens", *sys.argv[1:]]), "config_file": portable_path(config_file),
            "data_path": portable_path(data_path), "source_checkpoint": portable_path(source)}


def _train_perturb(args: argparse.Namespace) -> int:
    from bdlens.checkpoint import checkpoint_hash
    from bdlens.configs import config_path, portable_path
    from bdlens.training.distributed import Distributed
    from bdlens.training.perturbation import PerturbConfig, train_perturbation
    from bdlens.training.run import check_run_dir

    set_threads(args.threads)
    config_file = config_path(args.config)
    config = with_device(PerturbConfig.from_yaml(config_file), args.device)
    dist_info = Distributed.from_env(config.training.device)
    check_run_dir(args.out, args.resume, args.overwrite, dist_info.main, [args.source, config_file, _world_path(args.world)])
    bayes, manifest, sets, data_path = _posterior_and_data(args.source, args.world, ["train", "val"])
    extra = {
        "data_config": manifest["data_config"],
        "backbone_checkpoint": portable_path(args.source),
        "training": {**_provenance(args.source, config_file, data_path), "processes": dist_info.world_size},
    }
    checkpoint = train_perturbation(
        bayes, sets["train"], config, args.out, val_set=sets["val"], constants=sets["train"].constants,
        norm_stats=manifest["norm_stats"], resume=args.resume, manifest_extra=extra,
        depends={"--from checkpoint": checkpoint_hash(args.source)},
    )
    if dist_info.main:
        print(checkpoint)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json

    import bdlens
    from bdlens.configs import config_path
    from bdlens.errors import BdlensError
    from bdlens.outputs import prepare_output
    from bdlens.perturbation.calibrate import CALIBRATION, CALIBRATION_KIND, CALIBRATION_LAYOUT, CalibrationConfig, calibrate_checkpoint

    set_threads(args.threads)
    config_file = config_path(args.config)
    sppt_file = config_path(args.sppt) if args.sppt else None
    prepare_output(args.out, CALIBRATION_KIND, args.overwrite, inputs=[args.vi, args.perturb, config_file, sppt_file, _world_path(args.world)],
                   layout=CALIBRATION_LAYOUT, required=(CALIBRATION,))
    beside = (args.perturb or args.vi) / CALIBRATION if args.beside_checkpoint else None
    if beside is not None:
        if Path(bdlens.__file__).resolve().parent in beside.resolve().parents:
            raise BdlensError(f"{beside.parent} is inside the installed bdlens package; leave out --beside-checkpoint "
                              "(bundled checkpoints get their calibration from `bdlens train bundle`)")
        if beside.exists() and not args.overwrite:
            raise BdlensError(f"{beside} exists; pass --overwrite to replace it, or leave out --beside-checkpoint")
    config = CalibrationConfig.from_yaml(config_file)
    bayes, manifest, sets, data_path = _posterior_and_data(args.vi, args.world, ["val"])
    result = calibrate_checkpoint(
        bayes, manifest, sets["val"], config, args.out, perturb=args.perturb, sppt=args.sppt, vi_dir=args.vi,
        constants=sets["val"].constants, provenance=_provenance(args.vi, config_file, data_path), beside=beside,
    )
    before, after = result["before"], result["after"]
    print(json.dumps({"amplitude": result["amplitude"], "temperature": result["temperature"],
                      "crps": [before["crps"], after["crps"]], "spread_skill": [before["spread_skill"], after["spread_skill"]]}))
    print(args.out / CALIBRATION)
    return 0
