"""Cost per member-step of the diffusion baseline vs the hybrid Bayesian ensemble (demo configuration).

Both member sources step the same M members of one forecast from the analyses of the small demo
world (built or reused from the cache) by one 6 h step, side by side (interleaved, best of R, so load from other processes hits both alike):

* hybrid: the bundled system (VI posterior, K weight samples × J draws of its default perturbation),
  built by the engine (:meth:`bdlens.ensemble.Forecaster.source`);
* diffusion: :class:`bdlens.ensemble.diffusion.DiffusionMembers`, Heun with N steps (2N − 1 network
  evaluations), from ``--diffusion CHECKPOINT`` or, by default, an untrained denoiser of the demo
  configuration (the wall time of a step does not depend on the weights' values).

Prints wall time and network evaluations per member-step of each and their ratios.

    OMP_NUM_THREADS=2 python benchmarks/bench_diffusion.py [--members 8] [--weights 4] [--steps 20] [--repeats 3]
        [--diffusion RUN/checkpoint] [--perturbation learned] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bdlens import streams
from bdlens.checkpoint import bundled_checkpoint, read_manifest, save_checkpoint
from bdlens.data import Fields, open_dataset
from bdlens.ensemble import Design, Forecast, Forecaster, MemberSource
from bdlens.ensemble.diffusion import DiffusionMembers
from bdlens.models import ModelConfig
from bdlens.models.diffusion import KIND, Denoiser, EDMSettings, SamplerSettings
from bdlens.models.lead_time import Call
from bdlens.models.pretrained import layout_of
from bdlens.world.build import build


def untrained_diffusion(directory: Path, steps: int) -> Path:
    """A diffusion checkpoint of the bundled vi_6h's configuration with untrained weights (its
    normalisation statistics stand in for the residual ones: only the cost is measured)."""
    manifest = read_manifest(bundled_checkpoint("vi_6h"))
    config = ModelConfig.model_validate(manifest["model_config"])
    edm = EDMSettings()
    torch.manual_seed(0)
    return save_checkpoint(directory, Denoiser(config, edm).state_dict(), {
        "kind": KIND, "model_config": manifest["model_config"], "edm": edm.model_dump(mode="json"),
        "sampler": SamplerSettings(steps=steps).model_dump(mode="json"), "norm_stats": manifest["norm_stats"],
        "residual_stats": manifest["norm_stats"],
    })


def one_step(source: MemberSource, analysis: dict[int, Fields], init_key: int, members: int) -> Callable[[], Fields]:
    """A closure that runs the source's first 6 h step for ``members`` members of one forecast."""
    call = Call(step=6, lead=6, current=0, previous=-6)

    @torch.no_grad()
    def run() -> Fields:
        source.start(Forecast(init_key, tuple(range(members))))
        history = source.initial({h: Fields(*(x.expand(members, *x.shape[1:]) for x in f)) for h, f in analysis.items()})
        return source.step(history[-6], history[0], call)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--weights", type=int, default=4, help="K posterior weight samples of the hybrid (divides --members)")
    parser.add_argument("--steps", type=int, default=20, help="N, Heun steps of the diffusion sampler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--diffusion", type=Path, help="a trained diffusion checkpoint (default: untrained, demo configuration)")
    parser.add_argument("--perturbation", help="the hybrid's aleatoric scheme (default: the bundled system's default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    forecaster = Forecaster.from_pretrained(device="cpu")
    perturbation = args.perturbation or forecaster.default_perturbation()
    hybrid, _ = forecaster.source(Design.of(args.members, args.weights), perturbation, bayes=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.diffusion or untrained_diffusion(Path(tmp) / "diffusion", args.steps)
        diffusion = DiffusionMembers(checkpoint, seed=0, sampler=SamplerSettings(steps=args.steps))
    layout = layout_of(diffusion.models[6].model.config)
    data = open_dataset(build(small=True) / "analysis.zarr")
    init = data.time.values[4]
    analysis = {h: layout.to_tensors(data.sel(time=[init + np.timedelta64(h, "h")])) for h in (-6, 0)}
    sources = {f"hybrid ({perturbation})": hybrid, f"diffusion (N = {args.steps})": diffusion}
    runs = {name: one_step(source, analysis, streams.init_key(init), args.members) for name, source in sources.items()}
    for run in runs.values():
        run()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            tick = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - tick)
    print(f"{args.members} members, one 6 h step, best of {args.repeats}, {args.threads} threads")
    print(f"{'system':<28} {'s / member-step':>16} {'network evaluations / member-step':>34}")
    for name, source in sources.items():
        print(f"{name:<28} {best[name] / args.members:>16.4f} {source.network_evaluations:>34d}")
    (h, d), (hs, ds) = best.values(), sources.values()
    print(f"{'ratio diffusion / hybrid':<28} {d / h:>16.1f} {ds.network_evaluations / hs.network_evaluations:>34.1f}")


if __name__ == "__main__":
    main()
