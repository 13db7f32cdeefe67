"""The demo VI posterior against the deterministic model it was post-trained from (issue: Bayesian 3DEST).

Forecasts from the analysis at test-period inits to 5 days; the posterior forecast is the mean of K
members, each with its own weight sample kept for the whole rollout. Prints latitude-weighted RMSE
per lead of the deterministic and posterior-mean forecasts and the epistemic spread, and checks the
posterior mean is at most 2 % worse at every lead.

    python evaluation/vi_skill.py [--members 10] [--out evaluation/results/vi_skill.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bdlens.checkpoint import bundled_checkpoint
from bdlens.ensemble.rollout import deterministic_forecast, posterior_forecast
from bdlens.models.pretrained import load_trained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIELDS, load_demo_world, print_table, rmse_by_lead, spread_by_lead, test_inits, verification  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for step in (6, 24):
        parser.add_argument(f"--det-{step}h", type=Path, default=None, help=f"{step} h deterministic checkpoint (default: bundled)")
        parser.add_argument(f"--vi-{step}h", type=Path, default=None, help=f"{step} h VI posterior (default: bundled)")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--max-lead-hours", type=int, default=120)
    parser.add_argument("--init-every-hours", type=int, default=48)
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed relative RMSE increase")
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/vi_skill.json"))
    args = parser.parse_args(argv)

    det = {s: load_trained(getattr(args, f"det_{s}h") or bundled_checkpoint(f"det_{s}h")) for s in (6, 24)}
    vi = {s: getattr(args, f"vi_{s}h") or bundled_checkpoint(f"vi_{s}h") for s in (6, 24)}
    truth, analysis = load_demo_world()
    lead_hours = list(range(6, args.max_lead_hours + 1, 6))
    inits = test_inits(truth, args.max_lead_hours, args.init_every_hours)
    deterministic = deterministic_forecast(det, analysis, inits, lead_hours)
    posterior = posterior_forecast(vi, det[6].layout, analysis, inits, lead_hours, members=args.members, seed=0)
    truth_valid = verification(truth, deterministic)
    table = {
        key: {
            "deterministic": rmse_by_lead(deterministic, truth_valid, key),
            "posterior_mean": rmse_by_lead(posterior, truth_valid, key),
            "posterior_spread": spread_by_lead(posterior, key),
        }
        for key in FIELDS
    }
    ratios = {key: (np.asarray(t["posterior_mean"]) / np.asarray(t["deterministic"])).round(4).tolist() for key, t in table.items()}
    ok = all(max(r) <= 1 + args.tolerance for r in ratios.values())
    result = {"inits": [str(inits[0])[:13], str(inits[-1])[:13], len(inits)], "members": args.members, "lead_hours": lead_hours,
              "rmse": table, "ratio_posterior_mean_to_deterministic": ratios, "pass": ok}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"test inits {result['inits']}, K = {args.members}; latitude-weighted RMSE")
    labels = {"deterministic": "det", "posterior_mean": "VI mean", "posterior_spread": "spread"}
    columns = [(f, s, f"{f.upper()} {label}") for f in ("z500", "t850") for s, label in labels.items()]
    print_table(table, lead_hours, {6, 12, 24, 48, 72, 96, 120}, columns)
    print("max ratio posterior-mean / deterministic:", {k: max(v) for k, v in ratios.items()})
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
