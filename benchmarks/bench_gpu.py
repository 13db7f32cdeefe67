"""GPU cost of the 3DEST at the full Pangu-Weather configuration (configs/model_pangu.yaml: 0.25°, 13
levels, 64.2 M parameters) on synthetic random inputs (no world needed), printed as one table:

* forward pass (inference, no gradients) and training step (forward, weighted L1 loss, backward,
  AdamW) in seconds per sample and peak GPU memory, in fp32 and bf16 autocast, the training step
  with and without activation checkpointing (``checkpoint`` of the model config);
* a K = 8 posterior ensemble step (:mod:`bdlens.bayes.sampling`): the K weight samples in one
  vmapped pass (the fused member linear) against K serial passes, seconds per member.

Each row: ``--warmup`` untimed calls, then the mean of ``--repeats`` timed calls (the GPU
synchronised around them); a configuration that does not fit in memory is reported as such.

    python benchmarks/bench_gpu.py                  # on a GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --tiny           # the demo model on the CPU: the script end to end
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bdlens.bayes.posterior import PosteriorSettings, from_deterministic  # noqa: F401
from bdlens.bayes.sampling import forward_members, forward_sample, sample_weights
from bdlens.devices import autocast, resolve_device
from bdlens.models.config import ModelConfig
from bdlens.models.loss import WeightedL1Loss
from bdlens.models.transformer import EarthSpecificTransformer, count_parameters
from bdlens.training.batches import latitudes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float] | None:
    """(mean seconds per call, peak GPU memory in GiB, NaN on the CPU), or None when it runs out of memory."""
    try:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        return seconds, peak
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def inputs(config: ModelConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random normalised inputs: upper (B, T_in, V_u, Z, H, W), surface (B, T_in, V_s, H, W), constants (N_c, H, W)."""
    grid = (config.nlat, config.nlon)
    upper = torch.randn(batch, config.n_input_times, len(config.upper_variables), len(config.levels), *grid, device=device)
    surface = torch.randn(batch, config.n_input_times, len(config.surface_variables), *grid, device=device)
    constants = torch.randn(len(config.constants), *grid, device=device) if config.constants else None
    return upper, surface, constants


def backbone_rows(config: ModelConfig, device: torch.device, args: argparse.Namespace) -> list[dict]:
    upper, surface, constants = inputs(config, args.batch, device)
    target = (torch.randn_like(upper[:, -1]), torch.randn_like(surface[:, -1]))
    rows = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = EarthSpecificTransformer(config.model_copy(update={"checkpoint": checkpoint})).to(device)
        loss_fn = WeightedL1Loss(latitudes(model), config.upper_variables, config.surface_variables).to(device)
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for precision in ("fp32", "bf16"):
            if not checkpoint:  # checkpointing only acts in training

                @torch.no_grad()
                def forward() -> None:
                    with autocast(device, precision):
                        model.eval()(upper, surface, constants)  # noqa: F821

                rows.append({"what": "forward", "precision": precision, "checkpoint": "-", "result": measure(forward, device, args.warmup, args.repeats)})

            def step() -> None:
                model.train()  # noqa: F821
                with autocast(device, precision):
                    loss = loss_fn(model(upper, surface, constants), target)  # noqa: F821
                optimiser.zero_grad(set_to_none=True)  # noqa: F821
                loss.backward()
                optimiser.step()  # noqa: F821

            rows.append({"what": "training step", "precision": precision, "checkpoint": "yes" if checkpoint else "no",
                         "result": measure(step, device, args.warmup, args.repeats)})
        del model, optimiser
    return [{**row, "per": args.batch} for row in rows]


def posterior_rows(config: ModelConfig, device: torch.device, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    bayes = from_deterministic(EarthSpecificTransformer(config.model_copy(update={"checkpoint": False})).eval()).to(device)
    weights = sample_weights(bayes, args.members, seed=0)
    upper, surface, constants = inputs(config, 1, device)
    rows = []
    for precision in ("fp32", "bf16"):

        @torch.no_grad()
        def batched() -> None:
            with autocast(device, precision):
                forward_members(bayes, weights, upper, surface, constants)

        @torch.no_grad()
        def serial() -> None:
            with autocast(device, precision):
                for theta in weights:
                    forward_sample(bayes, theta, upper, surface, constants)

        for label, fn in ((f"K = {args.members} members, one vmapped pass", batched), (f"K = {args.members} members, K serial passes", serial)):
            rows.append({"what": label, "precision": precision, "checkpoint": "-", "per": args.members,
                         "result": measure(fn, device, args.warmup, args.repeats)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the demo model (configs/model_demo.yaml) instead of Pangu's")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1, help="samples per forward pass and training step (default 1)")
    parser.add_argument("--members", type=int, default=8, help="K of the posterior ensemble step (default 8)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = ModelConfig.from_yaml(CONFIGS / ("model_demo.yaml" if args.tiny else "model_pangu.yaml"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with torch.device("meta"):
        parameters = count_parameters(EarthSpecificTransformer(config))
    print(f"{'demo' if args.tiny else 'Pangu-Weather'} 3DEST: {parameters / 1e6:.1f} M parameters, {len(config.levels)} levels, "
          f"{config.nlat}x{config.nlon} grid; {name}, torch {torch.__version__}; batch {args.batch}, mean of {args.repeats} after {args.warmup}")
    rows = backbone_rows(config, device, args) + posterior_rows(config, device, args)
    print(f"| {'what':<40} | precision | checkpointing | s per sample/member | peak GiB |")
    print(f"|{'-' * 42}|-----------|---------------|---------------------|----------|")
    for row in rows:
        result = row["result"]
        cost = "out of memory" if result is None else f"{result[0] / row['per']:.4f}"
        peak = "-" if result is None or result[1] != result[1] else f"{result[1]:.1f}"
        print(f"| {row['what']:<40} | {row['precision']:<9} | {row['checkpoint']:<13} | {cost:>19} | {peak:>8} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "parameters": parameters, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
