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


def test_quick_start_describes_the_bundled_default_design() -> None:
    """The Quick start's K × J is what `bdlens ensemble --members 100` runs: the bundled default K."""
    import json

    system = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())
    k = system["default_weights"]
    quick_start = " ".join((ROOT / "README.md").read_text().split("## Command line")[0].split())
    assert f"100-member hybrid ensemble ({k} posterior weight samples × {100 // k} SPPT draws" in quick_start
    assert system["default_perturbation"] == "sppt"


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
    ratio = {k: dict(zip(vi["lead_hours"], r, strict=True)) for k, r in vi["ratio_posterior_mean_to_deterministic"].items()}
    spread = dict(zip(vi["lead_hours"], vi["rmse"]["z500"]["posterior_spread"], strict=True))
    row = _bundled_row("vi_6h")
    assert (f"{vi['members']}-member posterior mean {ratio['z500'][6]:.3f} (Z500) / {ratio['t850'][6]:.3f} (T850) × the deterministic "
            f"RMSE at 6 h; epistemic Z500 spread {spread[6]:.0f} m²/s²") in row
    row = _bundled_row("vi_24h")
    for key, name in (("z500", "Z500"), ("t850", "T850")):
        assert f"{name} {' / '.join(f'{ratio[key][h]:.2f}' for h in (24, 72, 120))}" in row
    assert f"epistemic Z500 spread {spread[24]:.0f} / {spread[120]:.0f} m²/s² at 1 d / 5 d" in row
    choice = json.loads((ROOT / "evaluation" / "results" / "mode_choice.json").read_text())["sets"]
    lead_mean = {k: sum(v["z500"]["crps"]) / len(v["z500"]["crps"]) for k, v in choice.items() if k.count("+") >= 2}
    assert min(lead_mean, key=lead_mean.get) == "seed1+seed2+seed3"  # "no other set of three or four scores better"

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

    import numpy as np
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
                          ("aleatoric", "aleatoric only:"), ("epistemic", "epistemic only:")):
        debiased = {h: value(system, "rmse", h) * (1 - value(system, "spread_skill", h) ** 2 / 17) ** 0.5 for h in (24, 72, 120, 240)}
        ratios = " / ".join(f"{debiased[h] / value('deterministic', 'rmse', h):.2f}" for h in debiased)
        shown = f"{' / '.join(f'{debiased[h]:.0f}' for h in debiased)}, i.e. {ratios}" if system == "hybrid" else ratios
        assert f"{label} {shown}" in " ".join(readme.split()), system
    assert (table[table.metric == "out_of_bounds_count"].value == 0).all()
    text = " ".join(readme.split())

    def series(system: str, field: str, metric: str) -> pd.Series:
        return table[(table.system == system) & (table.field == field) & (table.metric == metric)].set_index("lead_hours").value.sort_index()

    ssr = {f: series("hybrid", f, "spread_skill") for f in ("z500", "t850", "u850", "mslp")}
    assert f"spread-skill is {ssr['z500'].min():.2f}–{ssr['z500'].max():.2f} for Z500 and {ssr['t850'].min():.2f}–{ssr['t850'].max():.2f} for T850" in text
    assert all(ssr[f].between(0.8, 1.2).all() for f in ssr)  # the 0.8–1.2 at every lead, every field
    for f, label in (("u850", "U850 stays within"), ("mslp", "MSLP within")):
        assert f"{label} {ssr[f].min():.2f}–{ssr[f].max():.2f}" in text
    below = {f: 100 * (1 - series("hybrid", f, "crps") / series("aleatoric", f, "crps")) for f in ("z500", "t850", "u850", "mslp")}
    assert all((below[f] > 0).all() for f in ("t850", "u850", "mslp"))
    lost = below["z500"][below["z500"] <= 0]
    assert list(lost.index) == [168, 192]  # "for Z500 at every lead but 7 and 8 d"
    assert (f"at every lead for T850 ({below['t850'][24]:.1f} % … {below['t850'][240]:.1f} %), U850 and MSLP; for Z500 at every lead but 7 and "
            f"8 d ({below['z500'][24]:.1f} % at 1 d, {below['z500'][120]:.1f} % at 5 d, {below['z500'][240]:.1f} % at 10 d), where it is "
            f"{-lost[168]:.1f} and {-lost[192]:.1f} % worse") in text
    # the former calibration (T = 1, SPPT 1.55) on the same inits
    was = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_posterior_temperature_1.csv")

    def former_series(system: str, field: str, metric: str) -> pd.Series:
        return was[(was.system == system) & (was.field == field) & (was.metric == metric)].set_index("lead_hours").value.sort_index()

    t850_was = former_series("hybrid", "t850", "spread_skill")
    assert (t850_was > 1.2).idxmax() == 216 and (t850_was[t850_was.index >= 216] > 1.2).all()  # "over-dispersed from 9 d"
    assert f"({t850_was[216]:.2f} / {t850_was[240]:.2f} at 9 / 10 d)" in text
    lost_was = 100 * (former_series("hybrid", "z500", "crps") / former_series("aleatoric", "z500", "crps") - 1)
    assert (lost_was[lost_was.index >= 144] > 0).all() and (lost_was[lost_was.index < 144] < 0).all()
    assert f"at every lead from 6 d (by {lost_was[lost_was.index >= 144].min():.1f}–{lost_was.max():.1f} %)" in text
    z_change = 100 * (series("hybrid", "z500", "crps") / former_series("hybrid", "z500", "crps") - 1)
    assert (f"cuts the T850 spread-skill at 10 d to {ssr['t850'][240]:.2f} and the Z500 CRPS at 10 d by {-z_change[240]:.1f} %, at the cost "
            f"of {z_change[24]:.1f} % at 1 d") in text
    over = {f: 100 * (series("hybrid", f, "crps") / series("epistemic", f, "crps") - 1) for f in ("z500", "t850")}
    assert (over["t850"] < 0).all() and (over["z500"] < 0).all()  # "below the epistemic-only system's at every lead for both"
    assert f"(Z500 by {-over['z500'].max():.1f}–{-over['z500'].min():.1f} %, T850 by {-over['t850'].max():.1f}–{-over['t850'].min():.1f} %)" in text
    spread = {s: series(s, "z500", "spread_skill") * series(s, "z500", "rmse") for s in ("hybrid", "aleatoric", "epistemic")}
    share = spread["epistemic"] / spread["aleatoric"]
    assert f"The modes alone spread {share.min():.2f}–{share.max():.2f} × as much as SPPT alone (Z500)" in text
    single = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_single_mode.csv")

    def former(system: str, metric: str) -> pd.Series:
        return single[(single.system == system) & (single.field == "z500") & (single.metric == metric)].set_index("lead_hours").value.sort_index()

    before = former("epistemic", "spread_skill") * former("epistemic", "rmse") / (former("aleatoric", "spread_skill") * former("aleatoric", "rmse"))
    assert (share / before).between(1.3, 2.3).all() and 1.8 < (share / before)[[24, 48, 72]].mean() < 2.2  # "twice the single Gaussian's share"
    raw = series("hybrid", "z500", "rmse") / series("deterministic", "z500", "rmse")
    assert (raw[raw.index <= 72] > 1).all() and (raw[raw.index > 72] < 1).all()  # "above the deterministic forecast's to 3 d"
    assert f"({raw[24]:.3f} / {raw[48]:.3f} / {raw[72]:.3f} × at 1 / 2 / 3 d)" in text
    crps = table[table.metric == "crps"].pivot_table(index=["field", "system"], columns="lead_hours", values="value")
    beaten = (crps.loc["t850"].drop("climatology") > crps.loc["t850"].loc["climatology"]).all()  # "beats every AI system from 6 days on for T850"
    assert beaten[beaten.index >= 144].all() and not beaten[beaten.index < 144].any()
    z10 = crps.loc["z500"][240].drop("climatology")  # "for Z500 the hybrid is the only one it does not beat at 10 d"
    assert list(z10[z10 < crps.loc["z500"].loc["climatology", 240]].index) == ["hybrid"]
    sppt = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]
    assert f"SPPT amplitude {sppt['amplitude']:.2f} on every step model and posterior temperature {sppt['temperature']:g}" in " ".join(readme.split())
    assert sppt["config"] == "perturbation_sppt_surface" and f'"config": "{sppt["config"]}"' in readme
    before, after = sppt["calibration"]["before"], sppt["calibration"]["after"]
    assert f"{before['spread_skill']:.2f} → {after['spread_skill']:.2f}, CRPS in anomaly-std units {before['crps']:.3f} → {after['crps']:.3f}" in " ".join(readme.split())
    # the validation inits of the per-lead step: each field's own spread-skill range, as the record has it
    by_field = sppt["lead_calibration"]["per_lead"]["after"]["spread_skill_by_field"]
    ranges = {k: (min(v), max(v)) for k, v in by_field.items()}
    assert (f"stays within {min(r[0] for r in ranges.values()):.2f}–{max(r[1] for r in ranges.values()):.2f} ("
            + ", ".join(f"{label} {ranges[k][0]:.2f}–{ranges[k][1]:.2f}" for label, k in (("Z500", "geopotential:500"), ("T850", "temperature:850"),
                                                                                     ("U850", "u_component_of_wind:850"), ("MSLP", "mean_sea_level_pressure")))
            + ")") in " ".join(readme.split())
    # the validation inits of the per-lead step: the hybrid against SPPT alone
    hybrid_val, alone_val = sppt["lead_calibration"]["per_lead"]["after"], sppt["without_posterior"]["lead_calibration"]["per_lead"]["after"]
    h, a = np.asarray(hybrid_val["crps_by_lead"]), np.asarray(alone_val["crps_by_lead"])
    assert (h < a).all()  # "below SPPT-alone's at every lead from 1 to 10 days"
    assert (f"by {100 * (1 - h[0] / a[0]):.1f} % at 1 d and {100 * (1 - h[-1] / a[-1]):.1f} % at 10 d ({h[0]:.4f} against {a[0]:.4f} at 1 d, "
            f"{h[-1]:.4f} against {a[-1]:.4f} at 10 d; lead mean {h.mean():.4f} against {a.mean():.4f}), with spread-skill "
            f"{min(hybrid_val['spread_skill_by_lead']):.2f}–{max(hybrid_val['spread_skill_by_lead']):.2f} at every lead") in text
    # the calibration before, in units of the std over space and time: its test-period table
    former = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_total_std_units.csv")
    at10 = former[(former.system == "hybrid") & (former.metric == "spread_skill") & (former.lead_hours == 240)].set_index("field").value
    assert (f"to {at10['z500']:.2f} and {at10['t850']:.2f} at 10 d on the test period, with U850 and MSLP at {at10['u850']:.2f} and "
            f"{at10['mslp']:.2f}") in " ".join(readme.split())


def test_default_design_claims_are_what_the_committed_results_say() -> None:
    """The README's 100-member (default K = 20) test-period numbers come from
    evaluation/results/ensemble_skill_default_design.csv, rounded as printed."""
    import pandas as pd

    table = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_default_design.csv")
    text = " ".join((ROOT / "README.md").read_text().split())

    def series(system: str, field: str, metric: str) -> pd.Series:
        return table[(table.system == system) & (table.field == field) & (table.metric == metric)].set_index("lead_hours").value.sort_index()

    fields = ("z500", "t850", "u850", "mslp")
    below = {f: 100 * (1 - series("hybrid", f, "crps") / series("aleatoric", f, "crps")) for f in fields}
    assert all((below[f] > 0).all() for f in fields)  # "below the aleatoric-only system's at every lead for all four fields"
    z = below["z500"]
    assert f"(Z500 by {z[24]:.1f} % at 1 d, {z[120]:.1f} % at 5 d and {z[168]:.1f} % at 7 and 8 d)" in text and f"{z[192]:.1f}" == f"{z[168]:.1f}"
    over = {f: 100 * (1 - series("hybrid", f, "crps") / series("epistemic", f, "crps")) for f in ("z500", "t850")}
    assert all((over[f] > 0).all() for f in over)
    assert (f"(Z500 by {over['z500'].min():.1f}–{over['z500'].max():.1f} %, T850 by {over['t850'].min():.1f}–{over['t850'].max():.1f} %)") in text
    ssr = {f: series("hybrid", f, "spread_skill") for f in ("z500", "t850")}
    assert f"spread-skill {ssr['z500'].min():.2f}–{ssr['z500'].max():.2f} for Z500 and {ssr['t850'].min():.2f}–{ssr['t850'].max():.2f} for T850" in text
    raw = {f: series("hybrid", f, "rmse") / series("deterministic", f, "rmse") for f in ("z500", "t850")}
    assert (raw["t850"] < 1).all() and list(raw["z500"][raw["z500"] >= 1].index) == [48]  # "for Z500 at every lead but 2 d"
    assert f"for T850 ({raw['t850'][24]:.2f} × at 1 d, {raw['t850'][240]:.2f} × at 10 d)" in text
    members = 100  # debiased = RMSE · sqrt(1 − SSR²/(M+1)), as in the 16-member claims above
    debiased = raw["z500"][48] * (1 - ssr["z500"][48] ** 2 / (members + 1)) ** 0.5
    assert f"where it is {raw['z500'][48]:.4f} × (debiased {debiased:.4f} ×" in text
    alone = {s: (series(s, "z500", "rmse") / series("deterministic", "z500", "rmse"))[48] for s in ("aleatoric", "epistemic")}
    assert f"the SPPT members' mean alone is {alone['aleatoric']:.4f} × the deterministic RMSE at 2 d, the modes' mean (epistemic only) {alone['epistemic']:.3f} ×" in text
    assert (table[table.metric == "out_of_bounds_count"].value == 0).all()


def test_activity_limit_claims_are_what_the_committed_results_say() -> None:
    """The README's calibration steps and its activity-limit comparison come from the bundled ensemble.json,
    evaluation/results/ensemble_skill.csv and the same inits without the limit, rounded as printed."""
    import json

    import pandas as pd

    text = " ".join((ROOT / "README.md").read_text().split())
    sppt = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]
    alone = sppt["without_posterior"]
    before, after = alone["calibration"]["before"], alone["calibration"]["after"]
    assert (f"--out runs/cal12_aleatoric`: amplitude {alone['amplitude']:.2f} (pooled corrected spread-skill "
            f"{before['spread_skill']:.2f} → {after['spread_skill']:.2f}, CRPS in anomaly-std units {before['crps']:.3f} → {after['crps']:.3f})") in text
    assert set(alone["lead_factors"].values()) == {1.0}  # "They all stayed 1"
    factors = [sppt["lead_factors"][str(h)] for h in range(24, 241, 24)]
    assert factors[:6] == [1.0] * 6 and all(f < 1 for f in factors[6:])
    assert (f"fall to {factors[-1]:.2f} at 10 d ({' / '.join(f'{f:.2f}' for f in factors[6:9])} at 7 … 9 d)") in text
    per_lead = sppt["lead_calibration"]["per_lead"]
    gain = 100 * (1 - per_lead["after"]["objective"] / per_lead["before"]["objective"])
    assert (f"objective falls by {gain:.2f} % and the pooled 10-day spread-skill from {per_lead['before']['spread_skill_by_lead'][-1]:.2f} "
            f"to {per_lead['after']['spread_skill_by_lead'][-1]:.2f}") in text

    results = ROOT / "evaluation" / "results"
    # the limit's own comparison: the calibration made for it (T = 1) against the one before without it
    now, was = pd.read_csv(results / "ensemble_skill_posterior_temperature_1.csv"), pd.read_csv(results / "ensemble_skill_without_activity_limit.csv")

    def series(table: pd.DataFrame, system: str, field: str, metric: str) -> pd.Series:
        return table[(table.system == system) & (table.field == field) & (table.metric == metric)].set_index("lead_hours").value.sort_index()

    for label, system in (("the hybrid's Z500 activity at 10 d is", "hybrid"), ("and SPPT-alone's", "aleatoric")):
        assert f"{label} {series(now, system, 'z500', 'activity')[240]:.2f} × (was {series(was, system, 'z500', 'activity')[240]:.2f} ×)" in text
    ssr = {(f, t): series(table, "hybrid", f, "spread_skill") for f in ("z500", "u850") for t, table in (("now", now), ("was", was))}
    assert (f"Z500 spread-skill is {ssr['z500', 'now'].min():.2f}–{ssr['z500', 'now'].max():.2f} at every lead (was "
            f"{ssr['z500', 'was'].min():.2f}–{ssr['z500', 'was'].max():.2f}), U850's {ssr['u850', 'now'].min():.2f}–{ssr['u850', 'now'].max():.2f} "
            f"(was {ssr['u850', 'was'].min():.2f}–{ssr['u850', 'was'].max():.2f})") in text
    change = 100 * (series(now, "hybrid", "z500", "crps") / series(was, "hybrid", "z500", "crps") - 1)
    assert change[24] > 0 and (change[change.index >= 48] < 0).all()
    later = change[change.index >= 48]
    assert f"Z500 CRPS is {-later.max():.1f}–{-later.min():.1f} % lower from 2 to 10 d and {change[24]:.1f} % higher at 1 d" in text
    change = 100 * (series(now, "aleatoric", "z500", "crps") / series(was, "aleatoric", "z500", "crps") - 1)
    mslp = 100 * (series(now, "aleatoric", "mslp", "crps") / series(was, "aleatoric", "mslp", "crps") - 1)
    assert change[24] > 0 and (change[change.index >= 72] < 0).all() and (mslp > 0).all()
    later = change[change.index >= 72]
    assert (f"Z500 CRPS {-later.max():.1f}–{-later.min():.1f} % lower from 3 d on and {change[24]:.1f} % higher at 1 d; "
            f"MSLP {mslp.min():.1f}–{mslp.max():.1f} % higher at every lead") in text
    t850 = (series(now, "hybrid", "t850", "activity")[240], series(was, "hybrid", "t850", "activity")[240])
    assert f"the hybrid's T850 activity is {t850[0]:.2f} × at 10 d (was {t850[1]:.2f} ×)" in text
    assert f"against {series(now, 'deterministic', 'z500', 'activity')[240]:.2f} × for the deterministic forecast" in text


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

    for system, label in (("hybrid", "| hybrid (bundled: posterior"), ("diffusion", "| diffusion (`diffusion_24h`")):
        row = next(line for line in readme.splitlines() if line.startswith(label))
        cells = [f"{value(system, 'z500', 'crps', h):.0f} / {value(system, 'z500', 'spread_skill', h):.2f}" for h in (24, 72, 120)]
        cells += [f"{value(system, 't850', 'crps', h):.2f} / {value(system, 't850', 'spread_skill', h):.2f}" for h in (24, 72, 120)]
        cells.append(f"{value(system, 'all', 'wall_seconds_per_member_step') * 1000:.0f} ms, "
                     f"{value(system, 'all', 'network_evaluations_per_member_step'):.0f}")
        assert row.split(" | ", 1)[1].rstrip(" |").split(" | ") == cells, row
        assert value(system, "all", "out_of_bounds_count") == 0
    ratio = value("diffusion", "all", "wall_seconds_per_member_step") / value("hybrid", "all", "wall_seconds_per_member_step")
    text = " ".join(readme.split())
    assert f"at 1/{ratio:.0f} of the diffusion" in text
    ssr = [value("diffusion", "z500", "spread_skill", h) for h in (24, 48, 72, 96, 120)]
    assert f"The diffusion ensemble's spread-skill is {min(ssr):.2f}–{max(ssr):.2f} for Z500" in text
    assert (f"ensemble-mean Z500 RMSE is {value('diffusion', 'z500', 'rmse', 24):.0f} m²/s² at 1 d, against "
            f"{value('hybrid', 'z500', 'rmse', 24):.0f} for the hybrid") in text
    assert all(value("hybrid", key, "crps", h) < value("diffusion", key, "crps", h) for key in ("z500", "t850") for h in (24, 48, 72, 96, 120))



def test_study_findings_are_what_the_committed_study_results_say() -> None:
    """evaluation/README.md's "What the study shows" against evaluation/results/study.csv."""

    import pandas as pd

    text = " ".join((ROOT / "evaluation" / "README.md").read_text().split("### What the study shows", 1)[1].split("<!-- study:begin")[0].split())
    table = pd.read_csv(ROOT / "evaluation" / "results" / "study.csv")

    def series(system: str, variable: str, metric: str) -> pd.Series:
        rows = table[(table.system == system) & (table.variable == variable) & (table.metric == metric)]
        return rows.set_index("lead_hours").value.drop(-1, errors="ignore").sort_index()

    days = [24, 48, 72, 120, 168, 240]
    ssr = {v: series("hybrid", v, "spread_skill")[days] for v in ("z500", "t850")}
    assert f"spread-skill is {ssr['z500'].min():.2f}–{ssr['z500'].max():.2f} for Z500 from 1 to 10 days" in text
    t850 = ssr["t850"]
    assert f"and {t850[days[:-1]].min():.2f}–{t850[days[:-1]].max():.2f} for T850 to 7 days, rising to {t850[240]:.2f} at 10 days" in text
    outside = {v: [h for h in days if not 0.9 <= ssr[v][h] <= 1.1] for v in ssr}
    assert outside == {"z500": [], "t850": [240]}  # "the 0.9–1.1 goal is missed only for T850 at 10 days"
    former = pd.read_csv(ROOT / "evaluation" / "results" / "study_posterior_temperature_1.csv")

    def was(system: str, variable: str, metric: str) -> float:
        rows = former[(former.system == system) & (former.variable == variable) & (former.metric == metric) & (former.lead_hours == 240)]
        return float(rows.value.iloc[0])

    assert f"T850 reached {was('hybrid', 't850', 'spread_skill'):.2f} at 10 days and Z500 {was('hybrid', 'z500', 'spread_skill'):.2f})" in text
    spread = {(s, v): series(s, v, "spread") for s in ("hybrid", "climatology") for v in ("z500", "t850")}
    assert (f"Z500 {spread['hybrid', 'z500'][240]:.0f} against {spread['climatology', 'z500'][240]:.0f} m²/s², "
            f"T850 {spread['hybrid', 't850'][240]:.2f} against {spread['climatology', 't850'][240]:.2f} K; with the former calibration "
            f"{was('hybrid', 'z500', 'spread'):.0f} and {was('hybrid', 't850', 'spread'):.2f})") in text
    for v in ("z500", "t850"):  # "from 7 days the hybrid's spread exceeds the climatological ensemble's, less than before"
        above = spread["hybrid", v] > spread["climatology", v]
        assert not above[[6, 24, 48, 72, 120]].any() and above[[168, 240]].all()
        assert spread["hybrid", v][240] < was("hybrid", v, "spread")
    crps = {s: {v: series(s, v, "crps") for v in ("z500", "t850")} for s in table.system.unique()}
    worse = {v: (crps["hybrid"][v] > crps["climatology"][v]) for v in ("z500", "t850")}
    assert not worse["z500"].any()  # "for Z500 at no lead"
    assert not worse["t850"][[6, 24, 48, 72, 120]].any() and worse["t850"][[168, 240]].all()  # T850 from 7 days
    ai = [s for s in crps if s not in ("physics", "climatology", "persistence")]
    assert sorted(s for s in ai if crps[s]["z500"][240] < crps["climatology"]["z500"][240]) == ["deep-ensemble-sppt", "hybrid"]
    assert not [s for s in ai if crps[s]["t850"][240] < crps["climatology"]["t850"][240]]
    gap = {(o, v): (series(o, v, "crps_minus_hybrid"), series(o, v, "crps_minus_hybrid_ci95")) for o in ("epistemic", "aleatoric", "deep-ensemble-sppt")
           for v in ("z500", "t850")}
    beyond = {k: (g.abs() > ci) for k, (g, ci) in gap.items()}
    versus = {v: 100 * (1 - crps["hybrid"][v] / crps["aleatoric"][v]) for v in ("z500", "t850")}
    assert all((versus[v] > 0).all() for v in versus)  # "beats aleatoric-only at every lead for both fields"
    assert f"Z500 by {versus['z500'].min():.1f}–{versus['z500'].max():.1f} % and T850 by {versus['t850'].min():.1f}–{versus['t850'].max():.1f} %" in text
    assert beyond["aleatoric", "t850"].all() and list(beyond["aleatoric", "z500"][~beyond["aleatoric", "z500"]].index) == [168, 240]
    better = {v: 100 * (1 - crps["hybrid"][v] / crps["epistemic"][v]) for v in ("z500", "t850")}
    assert (better["t850"] > 0).all() and beyond["epistemic", "t850"].all()
    assert list(better["z500"][better["z500"] < 0].index) == [24] and beyond["epistemic", "z500"][24]  # "except at 1 day … beyond the interval"
    rest = better["z500"].drop([6, 24])
    assert f"for T850 (by {better['t850'].min():.1f}–{better['t850'].max():.1f} %) and for Z500 (by {rest.min():.1f}–{rest.max():.1f} %)" in text
    assert better["z500"][6] > rest.min()
    assert f"except at 1 day, where it is {-better['z500'][24]:.1f} % worse" in text
    deep = 100 * (crps["hybrid"]["z500"][days] / crps["deep-ensemble-sppt"]["z500"][days] - 1)
    ahead = [48, 72, 168, 240]
    assert deep[24] < 0 and abs(deep[120]) < 0.05 and (deep[ahead] > 0).all()
    assert list(beyond["deep-ensemble-sppt", "z500"][days][beyond["deep-ensemble-sppt", "z500"][days]].index) == [48, 72, 240]
    assert (f"level with it at 5 days ({abs(deep[120]):.2f} %), and better at 2, 3, 7 and 10 days: the hybrid's Z500 CRPS is "
            f"{deep[ahead].min():.1f}–{deep[ahead].max():.1f} % higher there") in text
    ratio = [crps["hybrid"]["z500"][h] / crps["physics"]["z500"][h] for h in (24, 72, 120, 240)]
    assert f"Z500 CRPS is {', '.join(f'{r:.1f}' for r in ratio[:3])} and {ratio[3]:.1f} times the physics" in text
    six = {s: crps[s]["z500"][6] for s in ai if 6 in crps[s]["z500"].index}
    assert sorted(six, key=six.get)[:2] == ["hybrid-learned", "ic"]  # "at 6 h ... score best of the AI systems"
    assert f"reaches {crps['hybrid-learned']['z500'][240]:.0f} m²/s² at 10 days" in text
    assert 1.9 < crps["hybrid-learned"]["z500"][240] / crps["climatology"]["z500"][240] < 2.3  # "twice climatology's"
    assert "on the bundled calibration" in text and "same realization of the demo world as the README's test-period table" in text
    assert all((crps["hybrid"][v][days] < crps["diffusion"][v][days]).all() for v in ("z500", "t850"))
    per_step = table[table.metric == "wall_seconds_per_member_step"].set_index("system").value
    cost = per_step["diffusion"] / per_step["hybrid"]
    assert f"about 1/{cost:.0f} of its cost" in text
    # the README's summary of the study
    summary = " ".join((ROOT / "README.md").read_text().split("The demo study (", 1)[1].split("## Python API")[0].split())
    assert f"at about 1/{cost:.0f} of its cost per member-step" in summary
    assert f"1 day for Z500, where the posterior at T = 1 is {-better['z500'][24]:.1f} % better" in summary
    ranges = {v: f"{series('hybrid', v, 'spread_skill')[days].min():.2f}–{series('hybrid', v, 'spread_skill')[days].max():.2f}"
              for v in ("z500", "t850")}
    old = {v: former[(former.system == "hybrid") & (former.variable == v) & (former.metric == "spread_skill") & former.lead_hours.isin(days)].value
           for v in ("z500", "t850")}
    assert (f"its spread-skill is {ranges['z500']} for Z500 and {ranges['t850']} for T850 from 1 to 10 days (with the former calibration at "
            f"T = 1: {old['z500'].min():.2f}–{old['z500'].max():.2f} and {old['t850'].min():.2f}–{old['t850'].max():.2f})") in summary
    assert f"level at 5 days and better at 2, 3, 7 and 10 days, by {deep[ahead].min():.1f}–{deep[ahead].max():.1f} % for Z500" in summary


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
    config = EnsembleCalibrationConfig.from_yaml(config_path("calibrate_ensemble_lead"))
    assert f"η = {config.per_lead.damping:g}" in text and f"After its {config.per_lead.iterations} iterations" in text
    alone = sppt["without_posterior"]
    for entry, step in ((sppt, "--checkpoint runs/sys12_modes --perturbation sppt --default"),
                        (alone, "--checkpoint runs/sys12_aleatoric --perturbation sppt --no-bayes")):
        record, factors = entry["lead_calibration"], entry["lead_factors"]
        assert record["config"] == config.model_dump(mode="json")
        assert (record["amplitude"], record["temperature"]) == (entry["amplitude"], entry["temperature"])
        assert record["command"].startswith(f"bdlens calibrate {step} --config calibrate_ensemble_lead --threads 1 --out runs/cal12_")
        assert max(factors.values()) <= 1.0
    # the amplitude (and temperature) steps ran the shipped calibration config, so the bundled choice of T is one it offers
    shipped = EnsembleCalibrationConfig.from_yaml(config_path("calibrate_ensemble_demo"))
    for entry, flag in ((sppt, "--default"), (alone, "--no-bayes")):
        assert entry["calibration"]["config"] == shipped.model_dump(mode="json")
        assert entry["calibration"]["command"].startswith(f"bdlens calibrate --checkpoint runs/sys12_base --perturbation sppt {flag} --threads 1")
    assert sppt["temperature"] in shipped.temperature.values and shipped.lead == "10d"
    new = pd.read_csv(ROOT / "evaluation" / "results" / "ensemble_skill_single_mode.csv")  # the hybrid the factors were made for
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
    """The README's posterior-temperature paragraph: evaluation/results/temperature_sweep.json on the bundled
    system, and the former single-mode bundle's sweep kept beside it."""
    import json

    import numpy as np

    text = " ".join((ROOT / "README.md").read_text().split())
    results = ROOT / "evaluation" / "results"
    result = json.loads((results / "temperature_sweep.json").read_text())
    sweep = result["by_temperature"]
    sppt = json.loads((ROOT / "bdlens" / "assets" / "models" / "ensemble.json").read_text())["schemes"]["sppt"]
    assert result["config"]["members"] == 18 and result["config"]["weights"] == 6 and len(result["inits"]) == 17
    assert "18 members (K = 6)" in text and "on the 17 validation inits its lead factors were fitted on" in text
    # the sweep ran the bundled calibration: its T = 0.25 run is the per-lead record's final evaluation (to the
    # round-off of another thread count)
    assert sppt["temperature"] == 0.25
    np.testing.assert_allclose(sweep["0.25"]["crps_by_lead"], sppt["lead_calibration"]["per_lead"]["after"]["crps_by_lead"], rtol=1e-7)
    np.testing.assert_allclose(sweep["0"]["crps_by_lead"], sppt["without_posterior"]["lead_calibration"]["per_lead"]["after"]["crps_by_lead"], rtol=1e-7)
    means = ", ".join(f"{sweep[t]['crps']:.4f} at T = {t}" for t in ("0", "0.05", "0.125", "0.25"))
    assert f"Lead-mean CRPS: {means} (the bundled system), {sweep['0.5']['crps']:.4f} at T = 0.5 and {sweep['1']['crps']:.4f} at T = 1" in text
    shown = ("0.125", "0.5", "1")
    day, ten = (" / ".join(f"{sweep[t]['crps_by_lead'][i]:.4f}" for t in shown) for i in (0, -1))
    t850 = " / ".join(f"{max(sweep[t]['spread_skill_by_field']['temperature:850']):.2f}" for t in shown)
    assert f"CRPS {day} at 1 d and {ten} at 10 d for T = 0.125 / 0.5 / 1, and T850's spread-skill reaches {t850}" in text
    by_lead = {t: r["crps_by_lead"] for t, r in sweep.items()}
    assert by_lead["0.125"][0] > by_lead["0.5"][0] > by_lead["1"][0] and by_lead["0.125"][-1] < by_lead["0.5"][-1] < by_lead["1"][-1]
    cold = [sweep[t]["crps"] for t in ("0.05", "0.125", "0.25")]
    assert 100 * (max(cold) / min(cold) - 1) < 0.03 and min(cold) < sweep["0.5"]["crps"] < sweep["1"]["crps"] < sweep["0"]["crps"]
    def objective(t: str, leads: int) -> float:
        crps, ssr = (np.asarray(sweep[t][k][:leads]) for k in ("crps_by_lead", "spread_skill_by_lead"))
        return float(np.mean(crps * (1 + np.log(ssr) ** 2)))

    offered = ("0.25", "0.5", "1")
    five, ten = ([objective(t, n) for t in offered] for n in (5, 10))
    assert 100 * (max(five) / min(five) - 1) < 0.09 and min(offered, key=lambda t: objective(t, 5)) == "0.5"
    assert min(offered, key=lambda t: objective(t, 10)) == "0.25"
    assert (f"within 0.09 % of each other ({' / '.join(f'{j:.4f}' for j in five)}), and T = 0.5 is best; scored to 10 d they are "
            f"{' / '.join(f'{j:.4f}' for j in ten)}, {100 * (max(ten) / min(ten) - 1):.1f} % apart") in text
    # the former single-mode posterior: no temperature beat SPPT alone at every lead
    former = json.loads((results / "temperature_sweep_single_mode.json").read_text())["by_temperature"]
    assert f"CRPS was {former['0']['crps']:.4f} at T = 0 and {former['1']['crps']:.4f} at T = 1" in text
    old = {t: r["crps_by_lead"] for t, r in former.items()}
    assert old["1"][0] < old["0"][0] and old["1"][-1] > old["0"][-1]
    assert all(any(c > a for c, a in zip(old[t], old["0"], strict=True)) for t in old if t != "0")


def test_prior_width_and_layer_claims_are_what_the_committed_results_say() -> None:
    """docs/science.md §4's prior-width and Bayesian-layer numbers come from evaluation/results/vi_variants.json."""
    import json

    import numpy as np

    text = " ".join((ROOT / "docs" / "science.md").read_text().split())
    results = json.loads((ROOT / "evaluation" / "results" / "vi_variants.json").read_text())
    variants = results["variants"]
    assert len(results["inits"]) == 17 and results["members"] == 16 and f"{len(results['inits'])} validation inits, {results['members']} members" in text
    widths = ("prior_narrow", "reference", "prior_wide")
    sigma = [variants[v]["sigma"] for v in widths]
    assert f"median σ over the 1.2 M weights is {sigma[0]['q50'] * 1e3:.2f}e-3 / {sigma[1]['q50'] * 1e3:.1f}e-3 / {sigma[2]['q50'] * 1e3:.1f}e-3" in text
    assert f"90th percentile {sigma[0]['q90'] * 1e3:.2f}e-3 / {sigma[1]['q90'] * 1e2:.2f}e-2 / {sigma[2]['q90'] * 1e2:.1f}e-2" in text
    # "every weight sits at σ_p", "the widest weights reach it", "even the widest tenth stays below half of σ_p"
    assert sigma[0]["q10"] > 0.8e-3 and sigma[0]["q90"] < 1.1e-3 and sigma[1]["q90"] > 1e-2 and sigma[2]["q90"] < 0.5 * 1e-1

    def z500(variant: str, system: str) -> dict:
        return variants[variant]["systems"][system]["z500"]

    ssr = " / ".join(f"{min(z500(v, 'epistemic T=1')['spread_skill']):.2f}–{max(z500(v, 'epistemic T=1')['spread_skill']):.2f}" for v in widths)
    crps = " / ".join(f"{np.mean(z500(v, 'epistemic T=1')['crps']):.1f}" for v in widths)
    assert f"spread-skill {ssr} from 1 to 10 d and lead-mean Z500 CRPS {crps} m²/s²" in text
    reference = np.asarray(z500("reference", "epistemic T=1")["rmse"])
    assert all(np.abs(np.asarray(z500(v, "epistemic T=1")["rmse"]) / reference - 1).max() < 0.04 for v in variants)  # "under 4 %"
    last = z500("last_stages", "epistemic T=1")
    assert variants["last_stages"]["sigma"]["weights"] == 147592 and "148 k of the 1.2 M weights" in text
    assert f"leaves {min(last['spread_skill']):.2f}–{max(last['spread_skill']):.2f} and {np.mean(last['crps']):.1f}" in text
    hybrid = {(v, t): np.mean(z500(v, f"hybrid T={t}")["crps"]) for v in ("reference", "prior_wide") for t in ("0.25", "0.125")}
    change = 100 * (hybrid[("prior_wide", "0.25")] / hybrid[("reference", "0.25")] - 1)
    assert (f"changes the lead-mean Z500 CRPS from {hybrid[('reference', '0.25')]:.1f} to {hybrid[('prior_wide', '0.25')]:.1f} "
            f"({change:+.1f} %), and at T = 0.125 to {hybrid[('prior_wide', '0.125')]:.1f}") in text
    assert abs(change) < 0.5  # "the prior width is not a lever"
