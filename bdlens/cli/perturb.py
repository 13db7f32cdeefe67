"""``bdlens train perturb``: the learned perturbation network (docs/science.md §5).

It starts from a VI posterior checkpoint (``bdlens train vi``); the data, normalisation statistics
and world come from its manifest, so the network is trained on the data the backbone saw. Its
amplitude is calibrated with the whole system by ``bdlens calibrate`` (:mod:`bdlens.cli.ensemble`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from bdlens.cli.options import add_data_options, add_device, add_run_mode, set_threads, with_device


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
    from bdlens.errors import BdlensError

    bayes, manifest = load_posterior(source)
    if manifest.get("mode_norm_stats"):
        # the trainer's ensemble normalises every member alike, which a mode trained with its own statistics is not
        raise BdlensError(f"{source} is a posterior with modes; train the perturbation network from its single-mode posterior (the --from of `bdlens train modes`)")
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
