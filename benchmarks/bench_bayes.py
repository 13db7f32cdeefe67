"""Cost of the variational Bayesian 3DEST on this machine (demo configuration, random weights).

1. Posterior sampling: K members in one batched (vmapped) pass vs K serial functional passes vs the
   deterministic model on a batch of K copies of the same input (the goal: batched ≤ 1.3× deterministic).
2. The per-step overhead of pyro's SVI (TraceMeanField_ELBO + pyro.optim.Adam): an SVI step, with
   pyro's argument validation on and off, vs a hand-written step with the same objective
   (:func:`bdlens.bayes.objective.tempered_loss`) and torch.optim.Adam. The VI trainer uses SVI
   (validation off) unless this overhead exceeds 20 % of a step.

    OMP_NUM_THREADS=2 python benchmarks/bench_bayes.py [--config configs/model_demo.yaml] [--members 10]
        [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.func import vmap

from bdlens.bayes.objective import model_and_guide, tempered_loss
from bdlens.bayes.posterior import PosteriorSettings, from_deterministic
from bdlens.bayes.sampling import forward_members, forward_sample, sample_weights
from bdlens.data.tensors import Fields, stack_times
from bdlens.grid import GRIDS
from bdlens.models import EarthSpecificTransformer, ModelConfig, WeightedL1Loss
from bdlens.training.distributed import Distributed
from bdlens.training.vi import TrainingSettings, svi_optimiser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402


def _state(config: ModelConfig, batch: int, g: torch.Generator) -> Fields:
    return Fields(
        torch.randn(batch, config.n_upper, config.n_levels, config.nlat, config.nlon, generator=g),
        torch.randn(batch, config.n_surface, config.nlat, config.nlon, generator=g),
    )


def bench_sampling(bayes, config: ModelConfig, members: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    upper = torch.randn(1, config.n_input_times, config.n_upper, config.n_levels, config.nlat, config.nlon, generator=g)
    surface = torch.randn(1, config.n_input_times, config.n_surface, config.nlat, config.nlon, generator=g)
    upper_k, surface_k = upper.expand(members, *upper.shape[1:]).contiguous(), surface.expand(members, *surface.shape[1:]).contiguous()
    base = bayes.base
    with torch.no_grad():
        weights = sample_weights(bayes, members, seed=0)
        rows = list(interleaved({
            "deterministic, batch of K": lambda: base(upper_k, surface_k),
            "batched K samples (vmap)": lambda: forward_members(bayes, weights, upper, surface),
            # the same vmap outside member_batched(): PyTorch's own rule for F.linear (bmm, then a separate bias add)
            "batched, vmap rule of F.linear": lambda: vmap(lambda theta: forward_sample(bayes, theta, upper, surface))(weights),
            "K serial functional passes": lambda: [forward_sample(bayes, w, upper, surface) for w in weights],
            "drawing K weight samples": lambda: sample_weights(bayes, members, seed=0),
        }, repeats).items())
    det = rows[0][1]
    print(f"\nposterior sampling, K = {members} members of one initial state ({bayes.posterior.size:,} Bayesian weights)")
    print(f"{'variant':30s} {'seconds':>9s} {'vs deterministic':>17s}")
    for label, sec in rows:
        print(f"{label:30s} {sec:9.3f} {sec / det:16.2f}x")
    timing = dict(rows)
    batched, draw = timing["batched K samples (vmap)"], timing["drawing K weight samples"]
    print(f"one batched pass: {batched / det:.2f}x the deterministic batch (goal ≤ 1.3x); serial / batched = "
          f"{timing['K serial functional passes'] / batched:.2f}; vmap rule of F.linear / fused = "
          f"{timing['batched, vmap rule of F.linear'] / batched:.2f}")
    # The weights are drawn once per forecast and kept for the whole rollout (docs/science.md §4).
    print(f"with drawing the weights: {(batched + draw) / det:.2f}x for a single step, "
          f"{(batched + draw / 20) / det:.2f}x per step of a 20-step (5-day) rollout")


def bench_svi(bayes, config: ModelConfig, batch: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(1)
    previous, current = _state(config, batch, g), _state(config, batch, g)
    data = (stack_times([previous, current]), _state(config, batch, g))
    latitude = GRIDS[config.grid].latitudes()
    loss_fn = WeightedL1Loss(latitude, config.upper_variables, config.surface_variables)
    post = bayes.posterior
    beta, n_data = 1e-4, 4000

    pyro.clear_param_store()
    model, guide = model_and_guide(bayes, loss_fn, beta, n_data)
    # The trainer's optimiser: pyro's Adam behind the gradient averaging (a no-op on one process).
    svi = SVI(model, guide, svi_optimiser(TrainingSettings(steps=1, lr_mu=1e-6, lr_rho=1e-6), Distributed()), TraceMeanField_ELBO())
    optimiser = torch.optim.Adam([post.mu, post.rho], lr=1e-6)

    def svi_step(validate: bool) -> Callable[[], float]:
        def step() -> float:
            with pyro.validation_enabled(validate):
                return svi.step(data)

        return step

    def hand_step() -> float:
        theta = post.mu + post.sigma * torch.randn_like(post.mu)
        loss = tempered_loss(bayes, theta, loss_fn, data, beta, n_data)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.item()

    times = interleaved({"validated": svi_step(True), "svi": svi_step(False), "hand": hand_step}, repeats)
    print(f"\nVI training step, batch {batch}: hand-written loop {times['hand']:.3f} s; pyro SVI {times['svi']:.3f} s "
          f"({times['validated']:.3f} s with pyro's argument validation on)")
    for label in ("validated", "svi"):
        extra = times[label] - times["hand"]
        share = extra / times[label]
        name = "SVI with validation" if label == "validated" else "SVI, validation off (the trainer's setting)"
        print(f"  {name:45s} overhead {extra:+.3f} s = {100 * share:5.1f} % of its step "
              f"({'≤' if share <= 0.2 else '>'} 20 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=ROOT / "configs" / "model_demo.yaml")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="training batch (configs/vi_demo.yaml: 4)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = ModelConfig.from_yaml(args.config)
    torch.manual_seed(0)
    bayes = from_deterministic(EarthSpecificTransformer(config), PosteriorSettings())
    print(f"demo model {args.config}, {torch.get_num_threads()} threads")
    bench_sampling(bayes, config, args.members, args.repeats)
    bench_svi(bayes, config, args.batch, args.repeats)


if __name__ == "__main__":
    main()
