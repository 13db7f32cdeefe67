"""What the prior width and the choice of Bayesian layers do to the epistemic spread and CRPS
(issue: skilful, calibrated default).

Each posterior of ``VARIANTS`` (the bundled ``configs/vi_demo_24h.yaml`` and its variants in
``evaluation/vi_variants/``: prior width σ_p 1e-3 and 1e-1 instead of 1e-2, or only the last stages
Bayesian) is post-trained by ``bdlens train vi`` from the bundled posterior's first mode
(``evaluation/deep_ensemble/det_24h_seed3``) into ``RUNS/NAME`` (a finished run is reused, a killed one
resumed). Each then replaces the bundled ``vi_24h`` in a copy of the bundled system and runs from the
analysis at 17 validation inits 10 days apart to 10 d, verified against the truth:

* as the epistemic-only system: the single Gaussian at T = 1 (its σ as trained), 16 weight samples;
* for the reference and the wide prior, as the bundled hybrid: their σ around the bundled posterior's
  three modes (``bdlens train modes``), the bundled SPPT calibration, K = 16 of 16 members, at the
  bundled temperature T = 0.25 and at T = 0.125.

Validation data only: this decides, it does not report test skill. Writes JSON (variant → σ
quantiles, training seconds and, per system, Z500 / T850 fair CRPS, ensemble-mean RMSE and
corrected spread-skill per lead) and a table on stdout.

    python evaluation/vi_variants.py [--runs runs/vi_variants] [--threads 1] [--out evaluation/results/vi_variants.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from bdlens import Forecaster
from bdlens.bayes.posterior import load_posterior
from bdlens.checkpoint import BUNDLED_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_demo_world  # noqa: E402
from ensemble_skill import engine_options, scores, split_inits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "evaluation/deep_ensemble/det_24h_seed3"
MODES = ("evaluation/deep_ensemble/det_24h_seed2", "evaluation/deep_ensemble/det_24h_seed1")
VARIANTS = {  # name → VI config (path relative to the repository, or a name in configs/)
    "reference": "vi_demo_24h",
    "prior_narrow": "evaluation/vi_variants/prior_narrow.yaml",
    "prior_wide": "evaluation/vi_variants/prior_wide.yaml",
    "last_stages": "evaluation/vi_variants/last_stages.yaml",
}
HYBRID = {"reference": (0.25, 0.125), "prior_wide": (0.25, 0.125)}  # variant → posterior temperatures of the hybrid
MEMBERS, INITS = 16, 17


def trained(name: str, runs: Path, threads: int) -> Path:
    """RUNS/NAME/checkpoint, post-training it first unless it exists (resuming a killed run)."""
    run = runs / name
    if not (run / "checkpoint").is_dir():
        resume = ["--resume"] if (run / "state.pt").is_file() else []
        subprocess.run([sys.executable, "-m", "bdlens", "-q", "train", "vi", "--from", SOURCE, "--config", VARIANTS[name],
                        "--out", str(run), "--threads", str(threads), *resume], check=True, cwd=ROOT)
    return run / "checkpoint"


def with_modes(name: str, runs: Path) -> Path:
    """The posterior of variant ``name`` with the bundled posterior's further modes, in RUNS/NAME_modes."""
    out = runs / f"{name}_modes"
    if not out.is_dir():
        subprocess.run([sys.executable, "-m", "bdlens", "-q", "train", "modes", "--from", str(runs / name / "checkpoint"),
                        "--modes", *MODES, "--out", str(out)], check=True, cwd=ROOT)
    return out


def system(folder: Path, posterior: Path) -> Forecaster:
    """The bundled system (its checkpoints and ensemble.json) with ``posterior`` as its 24 h posterior."""
    folder.mkdir()
    for entry in BUNDLED_DIR.iterdir():
        if entry.name != "vi_24h":
            (folder / entry.name).symlink_to(entry.resolve())
    (folder / "vi_24h").symlink_to(posterior.resolve())
    return Forecaster.from_pretrained(folder)


def sigma_quantiles(checkpoint: Path) -> dict[str, float]:
    """Quantiles 0.1 / 0.5 / 0.9 of the posterior's σ over its Bayesian weights, and how many there are."""
    bayes, _ = load_posterior(checkpoint)
    sigma = bayes.posterior.sigma.detach().double()
    q = torch.quantile(sigma[torch.randperm(sigma.numel(), generator=torch.Generator().manual_seed(0))[:2**20]],
                       torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"weights": sigma.numel(), "q10": float(q[0]), "q50": float(q[1]), "q90": float(q[2])}


def by_lead(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{field: {metric: values at leads 24, 48, … h}} for Z500 and T850 of one system's score rows."""
    table = pd.DataFrame(rows)
    table = table[table.field.isin(["z500", "t850"]) & (table.lead_hours > 0) & table.metric.isin(["crps", "rmse", "spread_skill"])]
    return {f: {m: g.sort_values("lead_hours").value.round(5).tolist() for m, g in t.groupby("metric")} for f, t in table.groupby("field")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/vi_variants"), help="where the posteriors are trained (reused if there)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each `bdlens train vi`")
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/vi_variants.json"))
    args = parser.parse_args(argv)
    if args.runs.exists() and not args.runs.is_dir():
        print(f"vi_variants: error: --runs {args.runs} is a file; give the folder the posteriors are (or will be) trained in", file=sys.stderr)
        return 2
    runs = args.runs.resolve()
    checkpoints = {name: trained(name, runs, args.threads) for name in VARIANTS}
    truth, analysis = load_demo_world()
    inits = [str(t) for t in split_inits(truth, "val", "10d", 10, INITS)]
    results = {"inits": inits, "members": MEMBERS, "lead_hours": list(range(24, 241, 24)), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpoint in checkpoints.items():
            manifest = json.loads((checkpoint / "manifest.json").read_text())
            entry = {"config": VARIANTS[name], "train_seconds": manifest.get("train_seconds"), "sigma": sigma_quantiles(checkpoint), "systems": {}}
            forecaster = system(Path(tmp) / name, checkpoint)
            forecast = forecaster.ensemble(init=inits, seed=0, data=analysis, out=Path(tmp) / f"{name}.zarr",
                                           **engine_options("epistemic", MEMBERS, None, "10d"))
            entry["systems"]["epistemic T=1"] = by_lead(scores("epistemic", forecast, truth))
            hybrid = system(Path(tmp) / f"{name}_modes", with_modes(name, runs)) if name in HYBRID else None
            for t in HYBRID.get(name, ()):
                forecast = hybrid.ensemble(init=inits, seed=0, data=analysis, out=Path(tmp) / f"{name}_hybrid_{t:g}.zarr", temperature=t,
                                           **engine_options("hybrid", MEMBERS, MEMBERS, "10d"))
                entry["systems"][f"hybrid T={t:g}"] = by_lead(scores("hybrid", forecast, truth))
            results["variants"][name] = entry
            for label, fields in entry["systems"].items():
                z = fields["z500"]
                print(f"{name:13s} {label:14s} Z500 CRPS {' '.join(f'{v:6.1f}' for v in z['crps'])} | spread-skill "
                      f"{' '.join(f'{v:.2f}' for v in z['spread_skill'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
