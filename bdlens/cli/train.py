"""``bdlens train``: the deterministic 3DEST, its variational post-training, the learned perturbation
(``bdlens.cli.perturb``) and bundling; every trainer runs on the one loop of :mod:`bdlens.training.loop`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bdlens.cli.options import add_data_options, add_device, add_run_mode, with_device


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bdlens train {deterministic,…}``."""
    train = subparsers.add_parser("train", help="train models on the demo world or WB2 data")
    commands = train.add_subparsers(dest="train_command", metavar="COMMAND", required=True)
    # The trainers that start from a training YAML (model, data, world, optimisation) rather than a checkpoint.
    from_config = (
        ("deterministic", "train the deterministic 3DEST for one step length", "Train the 3DEST on one step Δ (AdamW, warm-up + cosine).",
         "train_det_6h"),
        ("diffusion", "train the conditional EDM diffusion baseline on the 3DEST backbone",
         "Denoising score matching of a 3DEST denoiser conditioned on (X_{t-Δ}, X_t) with adaptive layer norms on the noise "
         "level (docs/science.md §8, docs/diffusion.md).", "diffusion_demo"),
    )
    for name, summary, what, example in from_config:
        command = commands.add_parser(
            name, help=f"{summary} (launch with torchrun for several processes)",
            description=f"{what} Writes OUT/metrics.jsonl, OUT/state.pt (exact resume) and OUT/checkpoint. "
            f"Data-parallel under torchrun: `torchrun --nproc_per_node N -m bdlens train {name} ...`.",
        )
        command.add_argument("--config", required=True, help=f"training YAML (path or name in configs/), e.g. {example}")
        command.add_argument("--out", type=Path, required=True, help="run directory (state, metrics log, final checkpoint/)")
        command.add_argument("--seed", type=int, help="replace the config's seed (initial weights, sample order, "
                             "analysis draws), e.g. for the members of a deep ensemble; recorded in the manifest's config")
        add_device(command, default=None)
        add_run_mode(command)
        command.set_defaults(func=_from_config)

    bundle = commands.add_parser("bundle", help="copy a trained checkpoint into the package's bundled demo models")
    bundle.add_argument("checkpoint", type=Path, help="checkpoint directory (RUN/checkpoint)")
    bundle.add_argument("--name", required=True, help="bundle name, e.g. det_6h")
    bundle.add_argument("--scores", type=Path, help="JSON of test-period scores to record in the manifest")
    bundle.add_argument("--overwrite", action="store_true", help="replace an existing bundle of that name")
    bundle.add_argument("--float16", action="store_true", help="store a VI posterior's Bayesian weights, modes and ρ in float16 "
                        "(half the size; the rounding, recorded in the manifest, is far below σ)")
    bundle.set_defaults(func=_bundle)

    modes = commands.add_parser(
        "modes", help="add independently trained models to a VI posterior as further modes (a mixture posterior)",
        description="q = (1/C) Σ_c N(m_c, diag σ²): the posterior's μ is mode 0, each --modes checkpoint's weights another mode, "
        "σ is shared (docs/science.md §4, \"Modes\"). Weight sample k is drawn around mode k mod C. Writes the posterior to OUT.",
    )
    modes.add_argument("--from", dest="source", type=Path, required=True, help="VI posterior (a `bdlens train vi` RUN/checkpoint)")
    modes.add_argument("--modes", type=Path, nargs="+", required=True, metavar="CKPT",
                       help="deterministic checkpoints of the same configuration and data, e.g. `bdlens train deterministic --seed N` outputs")
    modes.add_argument("--out", type=Path, required=True, help="checkpoint directory for the posterior with modes")
    modes.add_argument("--overwrite", action="store_true", help="replace a posterior that bdlens wrote at OUT")
    modes.set_defaults(func=_modes)

    vi = commands.add_parser(
        "vi",
        help="post-train a deterministic checkpoint with mean-field variational inference (epistemic uncertainty)",
        description="Mean-field Gaussian VI over the weights of a trained 3DEST (tempered ELBO, pyro SVI). The data, "
        "normalisation statistics and model configuration come from the deterministic checkpoint. "
        "Writes OUT/metrics.jsonl, OUT/state.pt (exact resume) and the posterior to OUT/checkpoint. "
        "Data-parallel under torchrun: `torchrun --nproc_per_node N -m bdlens train vi ...`.",
    )
    vi.add_argument("--from", dest="source", type=Path, required=True, help="deterministic checkpoint directory")
    vi.add_argument("--config", required=True, help="VI YAML (path or name in configs/), e.g. vi_demo")
    vi.add_argument("--out", type=Path, required=True, help="run directory (metrics log, state.pt, checkpoint/)")
    add_data_options(vi, trained_on="checkpoint")
    vi.add_argument("--analysis", type=Path, help="analysis store for analysis_input_probability > 0 (default: analysis.zarr beside the truth)")
    add_device(vi, default=None)
    add_run_mode(vi)
    vi.set_defaults(func=_vi)

    from bdlens.cli.perturb import register_perturb

    register_perturb(commands)


def _bundle(args: argparse.Namespace) -> int:
    import json

    from bdlens.errors import BdlensError
    from bdlens.training.bundle import bundle

    extra = {}
    if args.scores is not None:
        try:
            extra["test_scores"] = json.loads(args.scores.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BdlensError(f"cannot read scores {args.scores}: {err}") from err
    print(bundle(args.checkpoint, args.name, extra, overwrite=args.overwrite, float16=args.float16))
    return 0


def _modes(args: argparse.Namespace) -> int:
    from bdlens.training.bundle import add_modes

    print(add_modes(args.source, args.modes, args.out, shlex.join(["bdlens", *sys.argv[1:]]), overwrite=args.overwrite))
    return 0


def _from_config(args: argparse.Namespace) -> int:
    from bdlens.training.config import TrainConfig, load_train_config
    from bdlens.training.deterministic import train
    from bdlens.training.diffusion import DiffusionConfig, DiffusionObjective

    diffusion = args.train_command == "diffusion"
    cfg, path = load_train_config(args.config, DiffusionConfig if diffusion else TrainConfig)
    cfg = with_device(cfg, args.device)
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    command = shlex.join(["bdlens", *sys.argv[1:]])
    objective = DiffusionObjective if diffusion else None
    print(train(cfg, args.out, config_file=path, resume=args.resume, overwrite=args.overwrite, command=command, objective=objective))
    return 0

def _vi(args: argparse.Namespace) -> int:

    from bdlens.bayes.posterior import from_deterministic
    from bdlens.checkpoint import checkpoint_hash
    from bdlens.cli.options import set_threads
    from bdlens.cli.perturb import _world_path
    from bdlens.configs import config_path, portable_path
    from bdlens.data import analysis_dataset, analysis_path, checkpoint_datasets
    from bdlens.models.pretrained import load_trained
    from bdlens.training.distributed import Distributed
    from bdlens.training.run import CHECKPOINT, check_run_dir
    from bdlens.training.vi import VIConfig, train_vi

    set_threads(args.threads)
    config_file = config_path(args.config)
    config = with_device(VIConfig.from_yaml(config_file), args.device)
    dist_info = Distributed.from_env(config.training.device)
    trained = load_trained(args.source)
    check_run_dir(args.out, args.resume, args.overwrite, dist_info.main, [args.source, args.analysis, config_file, _world_path(args.world)])
    sets, data_config, data_path = checkpoint_datasets(trained.manifest, args.source, args.world, ["train", "val"],
                                                       made_by="bdlens train deterministic")
    extra = {
        "data_config": trained.manifest["data_config"],
        "source_checkpoint": portable_path(args.source),
        "training": {"command": shlex.join(["bdlens", *sys.argv[1:]]), "config_file": portable_path(config_file),
                     "data_path": portable_path(data_path), "processes": dist_info.world_size},
    }
    analysis = None
    if config.training.analysis_input_probability > 0:
        analysis = analysis_dataset(sets["train"], data_config, data_path, args.analysis)
        extra["training"]["analysis_path"] = portable_path(analysis_path(data_path, args.analysis))
    train_vi(
        from_deterministic(trained.model, config.posterior), sets["train"], config, args.out, val_set=sets["val"],
        constants=sets["train"].constants, norm_stats=trained.manifest["norm_stats"], resume=args.resume,
        manifest_extra=extra, analysis_set=analysis, depends={"--from checkpoint": checkpoint_hash(args.source)},
    )
    if dist_info.main:
        print(args.out / CHECKPOINT)
    return 0
