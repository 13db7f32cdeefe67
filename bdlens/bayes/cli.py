"""``bdlens train vi``: variational post-training of a trained deterministic 3DEST (SPEC §4).

:func:`register_vi` adds the sub-command to the ``bdlens train`` group (see ``bdlens/cli/train.py``).
The data, normalisation statistics and model configuration come from the deterministic checkpoint,
so the posterior is trained on exactly the data the pretrained model saw.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bdlens.cli.options import add_data_options, add_run_mode, set_threads


def register_vi(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``vi`` to the sub-commands of ``bdlens train``."""
    vi = train_subparsers.add_parser(
        "vi",
        help="post-train a deterministic checkpoint with mean-field variational inference (epistemic uncertainty)",
        description="Mean-field Gaussian VI over the weights of a trained 3DEST (tempered ELBO, pyro SVI). "
        "Writes OUT/metrics.jsonl, OUT/state.pt (exact resume) and the posterior to OUT/checkpoint. "
        "Data-parallel under torchrun: `torchrun --nproc_per_node N -m bdlens train vi ...`.",
    )
    vi.add_argument("--from", dest="source", type=Path, required=True, help="deterministic checkpoint directory")
    vi.add_argument("--config", required=True, help="VI YAML (path or name in configs/), e.g. vi_demo")
    vi.add_argument("--out", type=Path, required=True, help="run directory (metrics log, state.pt, checkpoint/)")
    add_data_options(vi, trained_on="checkpoint")
    vi.add_argument("--analysis", type=Path, help="analysis store for analysis_input_probability > 0 (default: analysis.zarr beside the truth)")
    add_run_mode(vi)
    vi.set_defaults(func=_vi)


def _vi(args: argparse.Namespace) -> int:
    from bdlens.bayes.posterior import from_deterministic
    from bdlens.bayes.trainer import VIConfig, train_vi
    from bdlens.checkpoint import checkpoint_hash
    from bdlens.configs import config_path
    from bdlens.data import DataConfig, make_datasets
    from bdlens.errors import BdlensError
    from bdlens.models.pretrained import load_trained
    from bdlens.training.batches import analysis_dataset, analysis_path
    from bdlens.training.deterministic import resolve_data_path
    from bdlens.training.distributed import Distributed
    from bdlens.training.run import CHECKPOINT, check_run_dir

    set_threads(args.threads)
    config_file = config_path(args.config)
    config = VIConfig.from_yaml(config_file)
    trained = load_trained(args.source)
    manifest = trained.manifest
    if "data_config" not in manifest:
        raise BdlensError(f"{args.source}/manifest.json has no data_config; retrain it with `bdlens train deterministic`")
    data_config = DataConfig.model_validate(manifest["data_config"])
    world = args.world or manifest.get("training", {}).get("data_path")
    if world is None:
        raise BdlensError(f"{args.source} does not say which data it was trained on; pass --world")
    data_path = resolve_data_path(world)
    dist_info = Distributed.from_env()
    check_run_dir(args.out, args.resume, args.overwrite, dist_info.main, [args.source, data_path, args.analysis, config_file])
    sets = make_datasets(data_config, data_path=data_path, splits=["train", "val"], in_memory=True)
    if sets["train"].stats.key != trained.stats.key:
        raise BdlensError(
            f"the normalisation statistics of {data_path} differ from those {args.source} was trained with; "
            "pass the same --world as the deterministic training"
        )
    extra = {
        "data_config": manifest["data_config"],
        "source_checkpoint": str(args.source),
        "training": {"command": shlex.join(["bdlens", *sys.argv[1:]]), "config_file": str(config_file), "data_path": str(data_path),
                     "processes": dist_info.world_size},
    }
    analysis = None
    if config.training.analysis_input_probability > 0:
        analysis = analysis_dataset(sets["train"], data_config, data_path, args.analysis)
        extra["training"]["analysis_path"] = str(analysis_path(data_path, args.analysis))
    train_vi(
        from_deterministic(trained.model, config.posterior),
        sets["train"],
        config,
        args.out,
        val_set=sets["val"],
        constants=sets["train"].constants,
        norm_stats=manifest["norm_stats"],
        resume=args.resume,
        manifest_extra=extra,
        analysis_set=analysis,
        depends={"--from checkpoint": checkpoint_hash(args.source)},
    )
    if dist_info.main:
        print(args.out / CHECKPOINT)
    return 0
