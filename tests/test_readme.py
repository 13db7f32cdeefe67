"""The README contract: `.ci/run` runs the Quick start's test command verbatim, and the CLI answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bdlens.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2
    main_job, test_job = commands
    assert "install.sh main" in main_job and "pytest" in test_job
    assert test_job in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    paths = [[]]
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public walk
        for name, sub in action.choices.items():
            paths.append([name])
            for sub_action in getattr(sub, "_subparsers", None)._group_actions if sub._subparsers else []:  # noqa: SLF001
                paths.extend([name, child] for child in sub_action.choices)
    assert ["world", "build"] in paths and ["train", "deterministic"] in paths and ["evaluate"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: bdlens" in capsys.readouterr().out


def test_version_and_nonsense_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "bdlens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "build", "--no-such-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _bundled_row(name: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))


def test_bundled_model_claims_are_what_the_committed_scripts_wrote() -> None:
    """Every number of the README's bundled-models table is read here from the result the named script
    or command wrote (evaluation/results/*.json, the manifests), rounded as printed."""
    import json

    from bdlens.checkpoint import bundled_checkpoint, read_manifest
    from bdlens.models import count_parameters
    from bdlens.models.pretrained import load_trained
    from bdlens.perturbation.learned import load_perturbation

    det = json.loads((ROOT / "evaluation" / "results" / "deterministic_skill.json").read_text())
    row = _bundled_row("det_6h")
    z500 = det["rmse"]["z500"]
    shown = [round(z500["model"][det["lead_hours"].index(h)]) for h in (6, 24, 72, 120)]
    assert "Z500 RMSE " + " / ".join(map(str, shown)) + " m²/s² at 6 h / 1 d / 3 d / 5 d" in row
    assert det["checks"]["z500"]["beats_persistence_6h_to_10d"] and det["lead_hours"][-1] == 240
    assert f"climatology to {det['checks']['z500']['climatology_crossover_hours'] - 6} h" in row
    assert f"{count_parameters(load_trained(bundled_checkpoint('det_6h')).model) / 1e6:.1f} M parameters" in row

    vi = json.loads((ROOT / "evaluation" / "results" / "vi_skill.json").read_text())
    row = _bundled_row("vi_6h")
    worst = {k: (max(r) - 1) * 100 for k, r in vi["ratio_posterior_mean_to_deterministic"].items()}
    assert f"{vi['members']}-member posterior mean within {worst['z500']:.2f} % (Z500) / {worst['t850']:.1f} % (T850)" in row
    spread = vi["rmse"]["z500"]["posterior_spread"]
    shown = [round(spread[vi["lead_hours"].index(h)]) for h in (6, 24, 120)]
    assert "epistemic Z500 spread " + " / ".join(map(str, shown)) + " m²/s² at 6 h / 1 d / 5 d" in row

    network, manifest = load_perturbation(bundled_checkpoint("perturb_6h"))
    row = _bundled_row("perturb_6h")
    assert f"({round(count_parameters(network), -3) // 1000:.0f} k parameters)" in row
    training = manifest["perturb_config"]["training"]
    assert f"fair CRPS over {training['members']} members and a 1→{training['curriculum']['max_rollout']}-step curriculum" in row
    diffusion = read_manifest(bundled_checkpoint("diffusion_24h"))
    diffusion_row = _bundled_row("diffusion_24h")
    one, two = diffusion["validation"]
    assert (one["lead_steps"], two["lead_steps"], diffusion["model_config"]["step_hours"]) == (1, 2, 24)
    assert f"trained for {diffusion['training']['config']['steps']} steps in {diffusion['training']['train_seconds']:.0f} s" in diffusion_row
    assert diffusion["training"]["train_seconds"] >= read_manifest(bundled_checkpoint("det_24h"))["training"]["train_seconds"]
    assert f"fair CRPS {one['crps']:.4f} / {two['crps']:.4f}, corrected spread-skill {one['spread_skill']:.2f} / {two['spread_skill']:.2f}" in diffusion_row
    six_hours, one_day = manifest["validation"]
    assert (six_hours["lead_steps"], one_day["lead_steps"], one_day["members"]) == (1, 4, 8)
    assert f"fair CRPS {six_hours['crps']:.4f} / {one_day['crps']:.4f}" in row
    assert f"corrected spread-skill {six_hours['spread_skill']:.2f} / {one_day['spread_skill']:.2f}" in row


def test_ensemble_claims_are_what_the_committed_results_say() -> None:
    """The README's default-ensemble numbers come from evaluation/results/ensemble_skill.csv and the
    bundled ensemble.json, rounded as printed."""
    import json

    import pandas as pd

    readme = (ROOT / "README.md").read_text()
    table = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill.csv")
    z500 = table[table.field == "z500"]

    def value(system: str, metric: str, hours: int) -> float:
        return float(z500[(z500.system == system) & (z500.metric == metric) & (z500.lead_hours == hours)].value.iloc[0])

    for system, label in (("hybrid", "| hybrid (posterior"), ("epistemic", "| epistemic only"), ("aleatoric", "| aleatoric only"),
                          ("ic", "| deterministic + IC"), ("bred", "| deterministic + bred"), ("climatology", "| climatology")):
        row = next(line for line in readme.splitlines() if line.startswith(label))
        cells = [f"{value(system, 'crps', h):.0f} / {value(system, 'spread_skill', h):.2f}" for h in (24, 72, 120, 240)]
        assert row.split(" | ", 1)[1].rstrip(" |").split(" | ") == cells, row
    physics = pd.read_csv(ROOT / "evaluation" / "results" / "physics_skill.csv")
    physics = physics[(physics.field == "z500") & (physics.system == "physics")]
    row = next(line for line in readme.splitlines() if line.startswith("| physics ensemble"))
    shown, gaps = [], []
    for h in (24, 72, 120, 240):
        at = physics[physics.lead_hours == h].set_index("metric").value
        shown.append(f"{at['crps']:.0f} / {at['spread_skill']:.2f}")
        gaps.append(f"{round(100 * (value('hybrid', 'crps', h) / at['crps'] - 1))}")
    assert row.split(" | ", 1)[1].rstrip(" |").split(" | ") == shown, row
    assert f"Z500 CRPS is {' / '.join(gaps)} % above it at 1 / 3 / 5 / 10 d" in " ".join(readme.split())
    for system in ("deterministic", "persistence"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {system} (RMSE)"))
        assert row.split(" | ", 1)[1].rstrip(" |").split(" | ") == [f"{value(system, 'rmse', h):.0f}" for h in (24, 72, 120, 240)]
    # debiased RMSE = RMSE · sqrt(1 − SSR²/(M+1)) with the corrected SSR of M = 16 members (s²/M = SSR² RMSE² / (M+1))
    for system, label in (("hybrid", "the debiased RMSE sqrt(MSE − s²/M), the estimate for the mean of infinitely many members, is"),
                          ("aleatoric", "aleatoric only:")):
        debiased = {h: value(system, "rmse", h) * (1 - value(system, "spread_skill", h) ** 2 / 17) ** 0.5 for h in (24, 72, 120, 240)}
        ratios = " / ".join(f"{debiased[h] / value('deterministic', 'rmse', h):.2f}" for h in debiased)
        shown = f"{' / '.join(f'{debiased[h]:.0f}' for h in debiased)}, i.e. {ratios}" if system == "hybrid" else ratios
        assert f"{label} {shown}" in " ".join(readme.split()), system
    assert (table[table.metric == "out_of_bounds_count"].value == 0).all()
    text = " ".join(readme.split())

    def series(system: str, field: str, metric: str) -> pd.Series:
        return table[(table.system == system) & (table.field == field) & (table.metric == metric)].set_index("lead_hours").value.sort_index()

    ssr = {f: series("hybrid", f, "spread_skill") for f in ("z500", "t850", "u850", "mslp")}
    assert f"spread-skill is {ssr['z500'].min():.2f}–{ssr['z500'].max():.2f} for Z500 at every lead to 10 d" in text
    assert f"T850 goes from {ssr['t850'][24]:.2f} at 1 d to {ssr['t850'][240]:.2f} at 10 d" in text
    assert (ssr["t850"] > 1.2).idxmax() == 192 and (ssr["t850"][ssr["t850"].index >= 192] > 1.2).all()  # "above 1.2 from 8 d"
    for f, label in (("u850", "U850 stays within"), ("mslp", "MSLP within")):
        assert f"{label} {ssr[f].min():.2f}–{ssr[f].max():.2f}" in text
    excess = {f: 100 * (series("hybrid", f, "crps") / series("aleatoric", f, "crps") - 1) for f in ("z500", "t850")}
    assert all(excess[f][24] < 0 and (excess[f][excess[f].index > 48] > 0).all() for f in excess)  # "below ... at 1 d, but not beyond"
    assert excess["z500"][48] > 0 and excess["z500"].idxmax() == excess["t850"].idxmax() == 240
    assert f"Z500 by at most {excess['z500'].max():.1f} %, T850 {excess['t850'].max():.1f} %, at 10 d" in text
    assert (series("hybrid", "z500", "crps") < series("epistemic", "z500", "crps")).all()
    spread = {s: series(s, "z500", "spread_skill") * series(s, "z500", "rmse") for s in ("hybrid", "aleatoric")}
    more = 100 * (spread["hybrid"] / spread["aleatoric"] - 1)
    assert f"the Z500 spread is {more.min():.1f}–{more.max():.1f} % above the aleatoric-only system's" in text
    crps = table[table.metric == "crps"].pivot_table(index=["field", "system"], columns="lead_hours", values="value")
    for f, first in (("z500", 168), ("t850", 120)):  # "beats every AI system from 7 days on for Z500 and from 5 days on for T850"
        beaten = (crps.loc[f].drop("climatology") > crps.loc[f].loc["climatology"]).all()
        assert beaten[beaten.index >= first].all() and not beaten[beaten.index < first].any()
    sppt = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]
    assert f"SPPT amplitude {sppt['amplitude']:.2f} on every step model and posterior temperature {sppt['temperature']:g}" in " ".join(readme.split())
    assert sppt["config"] == "perturbation_sppt_surface" and f'"config": "{sppt["config"]}"' in readme
    before, after = sppt["calibration"]["before"], sppt["calibration"]["after"]
    assert f"{before['spread_skill']:.2f} → {after['spread_skill']:.2f}, CRPS in climatological-std units {before['crps']:.3f} → {after['crps']:.3f}" in " ".join(readme.split())


def test_per_lead_calibration_claims_are_what_the_committed_results_say() -> None:
    """The README's per-lead calibration paragraph comes from the committed calibration record and skill CSV."""
    import json

    import pandas as pd

    text = " ".join((ROOT / "README.md").read_text().split())
    record = json.loads((ROOT / "evaluation" / "results" / "per_lead_calibration.json").read_text())
    per_lead, factors = record["per_lead"], record["lead_factors"]
    before, after = per_lead["before"], per_lead["after"]
    assert (f"spread-skill rises from {before['spread_skill_by_lead'][0]:.2f} at 1 d to {before['spread_skill_by_lead'][-1]:.2f} at 10 d"
            in text)
    assert f"factors ran from {factors['24']:.2f} at 1 d down to {factors['240']:.2f} at 10 d" in text
    gain = 100 * (1 - after["objective"] / before["objective"])
    assert f"fell by only {gain:.1f} % ({before['objective']:.4f} → {after['objective']:.4f})" in text
    assert f"10-day spread-skill only to {after['spread_skill_by_lead'][-1]:.2f}" in text
    table = pd.read_csv(ROOT / "evaluation" / "results" / "per_lead_skill.csv")
    z500 = table[(table.system == "hybrid") & (table.field == "z500")].set_index(["metric", "lead_hours"]).value
    cells = ", ".join(f"{z500['crps', h]:.0f} / {z500['spread_skill', h]:.2f}" for h in (24, 72, 120, 240))
    assert f"Z500 CRPS / spread-skill {cells} at 1 / 3 / 5 / 10 d" in text
    bundled = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_unperturbed_surface.csv")  # the system they were tuned for
    plain = bundled[(bundled.system == "hybrid") & (bundled.field == "z500")].set_index(["metric", "lead_hours"]).value
    assert all(z500["crps", h] > plain["crps", h] for h in (24, 48, 72, 96, 120))  # "worse than without them up to 5 d"
    at_one_day = bundled[(bundled.system == "hybrid") & (bundled.metric == "spread_skill") & (bundled.lead_hours == 24)]
    ssr = at_one_day.set_index("field").value
    assert f"spread-skill at 1 d was {ssr['mslp']:.2f} for MSLP against {ssr['z500']:.2f} for Z500 and T850" in text
    assert f"{ssr['t850']:.2f}" == f"{ssr['z500']:.2f}"


def test_diffusion_comparison_is_what_the_committed_results_say() -> None:
    """The README's hybrid-vs-diffusion table and cost ratio come from evaluation/results/diffusion_skill.csv."""
    import pandas as pd

    readme = (ROOT / "README.md").read_text()
    table = pd.read_csv(ROOT / "evaluation" / "results" / "diffusion_skill.csv")

    def value(system: str, key: str, metric: str, hours: int = -1) -> float:
        rows = table[(table.system == system) & (table.metric == metric) & (table.lead_hours == hours)]
        return float(rows[rows.field == key].value.iloc[0] if key != "all" else rows.value.iloc[0])

    for system, label in (("hybrid", "| hybrid (earlier calibration"), ("diffusion", "| diffusion (`diffusion_24h`")):
        row = next(line for line in readme.splitlines() if line.startswith(label))
        cells = [f"{value(system, 'z500', 'crps', h):.0f} / {value(system, 'z500', 'spread_skill', h):.2f}" for h in (24, 72, 120)]
        cells += [f"{value(system, 't850', 'crps', h):.2f} / {value(system, 't850', 'spread_skill', h):.2f}" for h in (24, 72, 120)]
        cells.append(f"{value(system, 'all', 'wall_seconds_per_member_step') * 1000:.0f} ms, "
                     f"{value(system, 'all', 'network_evaluations_per_member_step'):.0f}")
        assert row.split(" | ", 1)[1].rstrip(" |").split(" | ") == cells, row
        assert value(system, "all", "out_of_bounds_count") == 0
    ratio = value("diffusion", "all", "wall_seconds_per_member_step") / value("hybrid", "all", "wall_seconds_per_member_step")
    assert f"at 1/{ratio:.0f} of the diffusion" in " ".join(readme.split())



def test_study_findings_are_what_the_committed_study_results_say() -> None:
    """evaluation/README.md's "What the study shows" against evaluation/results/study.csv."""
    import json

    import pandas as pd

    text = " ".join((ROOT / "evaluation" / "README.md").read_text().split("### What the study shows", 1)[1].split("<!-- study:begin")[0].split())
    table = pd.read_csv(ROOT / "evaluation" / "results" / "study.csv")

    def series(system: str, variable: str, metric: str) -> pd.Series:
        rows = table[(table.system == system) & (table.variable == variable) & (table.metric == metric)]
        return rows.set_index("lead_hours").value.drop(-1, errors="ignore").sort_index()

    days = [24, 48, 72, 120, 168, 240]
    ssr = {v: series("hybrid", v, "spread_skill") for v in ("z500", "t850")}
    assert f"to {ssr['z500'][240]:.2f} (Z500) and {ssr['t850'][240]:.2f} (T850) at 10 days" in text
    assert all(0.9 <= ssr["z500"][h] <= 1.1 for h in (24, 48)) and not 0.9 <= ssr["z500"][72] <= 1.1  # "holds to 2 days (Z500)"
    assert all(0.9 <= ssr["t850"][h] <= 1.1 for h in (24, 48, 72)) and not 0.9 <= ssr["t850"][120] <= 1.1  # "3 days (T850)"
    spread = {(s, v): series(s, v, "spread") for s in ("hybrid", "climatology") for v in ("z500", "t850")}
    assert (f"Z500 {spread['hybrid', 'z500'][240]:.0f} against {spread['climatology', 'z500'][240]:.0f} m²/s², "
            f"T850 {spread['hybrid', 't850'][240]:.2f} against {spread['climatology', 't850'][240]:.2f} K") in text
    for v in ("z500", "t850"):  # "from 5 days its spread exceeds the climatological ensemble's"
        above = spread["hybrid", v] > spread["climatology", v]
        assert not above[[6, 24, 48, 72]].any() and above[[120, 168, 240]].all()
    crps = {s: {v: series(s, v, "crps") for v in ("z500", "t850")} for s in table.system.unique()}
    worse = {v: (crps["hybrid"][v] > crps["climatology"][v]) for v in ("z500", "t850")}
    assert not worse["z500"][[6, 24, 48, 72, 120]].any() and worse["z500"][[168, 240]].all()  # from 7 days for Z500
    assert not worse["t850"][[6, 24, 48, 72]].any() and worse["t850"][[120, 168, 240]].all()  # and 5 days for T850
    ai = [s for s in crps if s not in ("physics", "climatology", "persistence")]
    assert all(crps[s][v][240] > crps["climatology"][v][240] for s in ai for v in ("z500", "t850"))  # none beats it at 10 d
    excess = [100 * (crps["hybrid"]["z500"][h] / crps["aleatoric"]["z500"][h] - 1) for h in (72, 120, 168, 240)]
    assert f"by {min(excess):.1f}–{max(excess):.1f} %" in text
    gap, half = series("aleatoric", "t850", "crps_minus_hybrid"), series("aleatoric", "t850", "crps_minus_hybrid_ci95")
    assert (gap[[6, 24, 48, 72]] > half[[6, 24, 48, 72]]).all() and not (gap < -half).any()  # T850 "better to 3 days and worse at no lead"
    factors = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]["lead_factors"]
    assert max(f for h, f in factors.items() if int(h) <= 72) == 1.0 and factors["96"] < 1.0  # "damp ... from 4 days on"
    assert f"(to {factors['240']:.2f} of it at 10 days;" in text
    assert all((crps["deep-ensemble-sppt"][v][days] < crps["hybrid"][v][days]).all() for v in ("z500", "t850"))
    ratio = [crps["hybrid"]["z500"][h] / crps["physics"]["z500"][h] for h in (24, 72, 120, 240)]
    assert f"Z500 CRPS is {', '.join(f'{r:.1f}' for r in ratio[:3])} and {ratio[3]:.1f} times the physics" in text
    six = {s: crps[s]["z500"][6] for s in ai if 6 in crps[s]["z500"].index}
    assert sorted(six, key=six.get)[:2] == ["hybrid-learned", "ic"]  # "at 6 h ... score best of the AI systems"
    assert f"reaches {crps['hybrid-learned']['z500'][240]:.0f} m²/s² at 10 days" in text
    assert 1.9 < crps["hybrid-learned"]["z500"][240] / crps["climatology"]["z500"][240] < 2.3  # "twice climatology's"
    per_step = table[table.metric == "wall_seconds_per_member_step"].set_index("system").value
    cost = per_step["diffusion"] / per_step["hybrid"]
    assert f"about 1/{cost:.0f} of its cost" in text


def test_damping_lead_factor_claims_are_what_the_committed_results_say() -> None:
    """The README's bundled per-lead factors: the bundle's lead_calibration record and the test-period CSVs
    with and without them."""
    import json

    import numpy as np
    import pandas as pd

    from bdlens.configs import config_path
    from bdlens.training.calibration import EnsembleCalibrationConfig

    text = " ".join((ROOT / "README.md").read_text().split())
    sppt = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]
    record, factors = sppt["lead_calibration"], sppt["lead_factors"]
    config = EnsembleCalibrationConfig.from_yaml(config_path("calibrate_ensemble_lead"))
    assert record["config"] == config.model_dump(mode="json") and f"η = {config.per_lead.damping:g}" in text
    assert f"After its {config.per_lead.iterations} iterations" in text
    assert (record["amplitude"], record["temperature"]) == (sppt["amplitude"], sppt["temperature"])
    assert record["command"].startswith("bdlens calibrate --perturbation sppt --default --config calibrate_ensemble_lead --out runs/cal_lead")
    assert max(factors.values()) <= 1.0 and all(round(factors[h], 2) == 1.0 for h in ("24", "48", "72"))
    assert f"stay 1.00 to 3 d and fall to {factors['240']:.2f} at 10 d" in text
    assert f"({' / '.join(f'{factors[str(h)]:.2f}' for h in range(96, 217, 24))} at 4 … 9 d)" in text
    before, after = record["per_lead"]["before"], record["per_lead"]["after"]
    assert f"from {before['spread_skill_by_lead'][-1]:.2f} to {after['spread_skill_by_lead'][-1]:.2f}" in text
    assert f"falls by {100 * (1 - after['objective'] / before['objective']):.1f} %" in text
    new = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill.csv")
    old = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_without_lead_factors.csv")
    key = ["system", "field", "lead_hours", "metric"]
    both = new.merge(old, on=key, suffixes=("", "_old"), validate="one_to_one")
    assert len(both) == len(new) == len(old)
    others = both[~both.system.isin(["hybrid", "aleatoric"])]  # "the other rows do not read the SPPT calibration"
    assert len(others) and (others.value == others.value_old).all()

    def hybrid(table: pd.DataFrame, field: str, metric: str) -> pd.Series:
        return table[(table.system == "hybrid") & (table.field == field) & (table.metric == metric)].set_index("lead_hours").value

    for field, fmt, unit in (("z500", ".0f", "Z500"), ("t850", ".2f", "T850")):
        c0, c1 = hybrid(old, field, "crps"), hybrid(new, field, "crps")
        s0, s1 = hybrid(old, field, "spread_skill"), hybrid(new, field, "spread_skill")
        assert f"{unit} CRPS at 10 d {c0[240]:{fmt}} → {c1[240]:{fmt}}, spread-skill {s0[240]:.2f} → {s1[240]:.2f}" in text
        # "unchanged to 3 d" (the same draws and factors 1: equal to float32 round-off of a run on other threads)
        np.testing.assert_allclose(c1[[24, 48, 72]], c0[[24, 48, 72]], rtol=1e-7)
        assert (c1 <= c0 * (1 + 1e-7)).all()  # "no worse for Z500 or T850 at any later lead"
    ssr = {f: (hybrid(old, f, "spread_skill")[240], hybrid(new, f, "spread_skill")[240]) for f in ("mslp", "u850")}
    assert f"MSLP spread-skill at 10 d {ssr['mslp'][0]:.2f} → {ssr['mslp'][1]:.2f}, U850 {ssr['u850'][0]:.2f} → {ssr['u850'][1]:.2f}" in text
    u0, u1 = hybrid(old, "u850", "crps")[240], hybrid(new, "u850", "crps")[240]
    assert f"U850's CRPS is {100 * (u1 / u0 - 1):.1f} % worse at 10 d ({u0:.3f} → {u1:.3f})" in text


def test_temperature_sweep_claims_are_what_the_committed_results_say() -> None:
    """The README's posterior-temperature paragraph: evaluation/results/temperature_sweep.json, whose T = 1 run
    is the bundled system of the per-lead calibration record."""
    import json

    text = " ".join((ROOT / "README.md").read_text().split())
    sweep = json.loads((ROOT / "evaluation" / "results" / "temperature_sweep.json").read_text())["by_temperature"]
    record = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]["lead_calibration"]
    assert abs(sweep["1"]["crps"] - record["per_lead"]["after"]["crps"]) < 1e-9  # "reproduces its calibration record"
    means = ", ".join(f"{sweep[t]['crps']:.4f} at T = {t}" for t in ("0", "0.25", "0.5"))
    assert f"Lead-mean CRPS: {means}" in text.replace(" (aleatoric only)", "")
    assert f"{sweep['1']['crps']:.4f} at T = 1 (the bundled system" in text and f"{sweep['2']['crps']:.4f} at T = 2" in text
    day, ten = ([f"{sweep[t]['crps_by_lead'][i]:.4f}" for t in ("0", "1", "2")] for i in (0, -1))
    assert f"CRPS {' / '.join(day)} at 1 d and {' / '.join(ten)} at 10 d for T = 0 / 1 / 2" in text
    by_lead = {t: r["crps_by_lead"] for t, r in sweep.items()}
    assert by_lead["0"][0] > by_lead["1"][0] > by_lead["2"][0] and by_lead["0"][-1] < by_lead["1"][-1] < by_lead["2"][-1]
    # "no temperature makes the hybrid better than aleatoric-only at every lead, and T = 1 stays"
    assert all(any(c > a for c, a in zip(by_lead[t], by_lead["0"], strict=True)) for t in by_lead if t != "0")
    assert min(sweep, key=lambda t: sweep[t]["crps"]) in ("0.5", "1") and abs(sweep["0.5"]["crps"] - sweep["1"]["crps"]) < 1e-5
