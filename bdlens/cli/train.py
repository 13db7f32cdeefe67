"""``bdlens train``: deterministic 3DEST training (and the variational post-training, when present)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bdlens.cli.options import add_run_mode


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bdlens train {deterministic,…}``."""
    train = subparsers.add_parser("train", help="train models on the demo world or WB2 data")
    commands = train.add_subparsers(dest="train_command", metavar="COMMAND", required=True)
    det = commands.add_parser(
        "deterministic",
        help="train the deterministic 3DEST for one step length (launch with torchrun for several processes)",
        description="Train the 3DEST on one step Δ (AdamW, warm-up + cosine). Writes OUT/metrics.jsonl, OUT/state.pt "
        "(exact resume) and OUT/checkpoint. Data-parallel under torchrun: `torchrun --nproc_per_node N -m bdlens train "
        "deterministic ...`.",
    )
    det.add_argument("--config", required=True, help="training YAML (path or name in configs/), e.g. train_det_6h")
    det.add_argument("--out", type=Path, required=True, help="run directory (state, metrics log, final checkpoint/)")
    add_run_mode(det)
    det.set_defaults(func=_deterministic)

    bundle = commands.add_parser("bundle", help="copy a trained checkpoint into the package's bundled demo models")
    bundle.add_argument("checkpoint", type=Path, help="checkpoint directory (RUN/checkpoint)")
    bundle.add_argument("--name", required=True, help="bundle name, e.g. det_6h")
    bundle.add_argument("--scores", type=Path, help="JSON of test-period scores to record in the manifest")
    bundle.add_argument("--overwrite", action="store_true", help="replace an existing bundle of that name")
    bundle.set_defaults(func=_bundle)
    try:
        from bdlens.bayes.cli import register_vi
    except ImportError:  # the variational layer is optional until it lands
        return
    register_vi(commands)
    try:
        from bdlens.cli.perturb import register_perturb
    except ImportError:  # the learned perturbation is optional until it lands
        return
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
    print(bundle(args.checkpoint, args.name, extra, overwrite=args.overwrite))
    return 0


def _deterministic(args: argparse.Namespace) -> int:
    from bdlens.training.config import load_train_config
    from bdlens.training.deterministic import train

    cfg, path = load_train_config(args.config)
    command = shlex.join(["bdlens", *sys.argv[1:]])
    print(train(cfg, args.out, config_file=path, resume=args.resume, overwrite=args.overwrite, command=command))
    return 0
