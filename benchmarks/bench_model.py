"""Speed of the demo 3DEST on this machine's CPUs and the size of the full Pangu-Weather model.

Prints forward time per sample (inference), training samples per second (forward + backward +
AdamW step) and their ratio, with gradient checkpointing and bf16 autocast side by side, then the
parameter count of configs/model_pangu.yaml built on the meta device (no memory, no compute).

    OMP_NUM_THREADS=2 python benchmarks/bench_model.py [--config configs/model_demo.yaml] [--batch 4]
        [--embed-dim 48 64]   # other widths, same head dimension, for sizing the demo model
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bdlens.grid import GRIDS
from bdlens.models import EarthSpecificTransformer, ModelConfig, WeightedL1Loss, count_parameters

ROOT = Path(__file__).resolve().parents[1]


def _batch(config: ModelConfig, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    t, z, h, w = config.n_input_times, config.n_levels, config.nlat, config.nlon
    return (
        torch.randn(batch, t, config.n_upper, z, h, w, generator=g),
        torch.randn(batch, t, config.n_surface, h, w, generator=g),
        torch.randn(batch, config.n_upper, z, h, w, generator=g),
        torch.randn(batch, config.n_surface, h, w, generator=g),
    )


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_demo(config: ModelConfig, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    upper, surface, target_upper, target_surface = _batch(config, batch)
    latitude = GRIDS[config.grid].latitudes() if config.grid else torch.linspace(-80, 80, config.nlat).numpy()
    loss_fn = WeightedL1Loss(latitude, config.upper_variables, config.surface_variables)
    print(f"demo model: {count_parameters(EarthSpecificTransformer(config)):,} parameters, batch {batch}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for label, checkpointing, autocast in (
        ("fp32", False, False),
        ("fp32 + checkpointing", True, False),
        ("bf16 autocast", False, True),
    ):
        model = EarthSpecificTransformer(config.model_copy(update={"checkpoint": checkpointing}))
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
        context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext

        def forward() -> None:
            model.eval()
            with torch.no_grad(), context():
                model(upper, surface)

        def train_step() -> None:
            model.train()
            with context():
                loss = loss_fn(model(upper, surface), (target_upper, target_surface))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        fwd = _seconds(forward, repeats) / batch
        step = _seconds(train_step, repeats) / batch
        rows.append((label, fwd, step))
    base = rows[0][2]
    print(f"{'variant':24s} {'forward s/sample':>17s} {'train samples/s':>16s} {'train/forward':>14s} {'train vs fp32':>14s}")
    for label, fwd, step in rows:
        print(f"{label:24s} {fwd:17.4f} {1 / step:16.2f} {step / fwd:14.2f} {base / step:14.2f}")


def bench_pangu(path: Path) -> None:
    config = ModelConfig.from_yaml(path)
    with torch.device("meta"):
        model = EarthSpecificTransformer(config)
    total = count_parameters(model)
    bias = sum(m.attn.earth_bias.numel() for m in model.modules() if hasattr(m, "attn"))
    print(f"Pangu-Weather ({path.name}): {total:,} parameters ({total / 1e6:.1f} M; published ≈ 64.2 M), "
          f"Earth-specific bias tables {bias:,} ({bias / total:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "model_demo.yaml")
    parser.add_argument("--pangu", type=Path, default=ROOT / "configs" / "model_pangu.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embed-dim", type=int, nargs="*", default=[], help="also time these widths")
    args = parser.parse_args()
    config = ModelConfig.from_yaml(args.config)
    bench_demo(config, args.batch, args.repeats)
    for dim in args.embed_dim:
        heads = tuple(h * dim // config.embed_dim for h in config.heads)
        bench_demo(ModelConfig.from_dict(config.model_dump() | {"embed_dim": dim, "heads": heads}), args.batch, args.repeats)
    bench_pangu(args.pangu)


if __name__ == "__main__":
    main()
