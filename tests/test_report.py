"""``bdlens report`` end to end on small synthetic stores: contents, tables, bad inputs, and the page in headless Chromium.

The browser test needs Debian's ``chromium`` (``.ci/run`` installs it); it is skipped only when
``BDLENS_SKIP_BROWSER=1`` is set, so that CI cannot pass without rendering the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from synthetic import synthetic_dataset, synthetic_forecast

from bdlens.cli import main
from bdlens.evaluate import evaluate
from bdlens.outputs import MARKER

FIELDS = ["geopotential:500", "2m_temperature"]
HYBRID_ATTRS = {
    "bdlens_version": "0.1.0",
    "system": "hybrid: posterior + sppt",
    "command": "bdlens ensemble --members 6",
    "config": json.dumps({"members": 6, "sppt": {"amplitude": 0.9}}),
    "seed": 7,
    "checkpoints": json.dumps({"vi_6h": "ab" * 32}),
    "network_evaluations_per_member_step": 2.0,
    "wall_seconds_per_member_step": 0.0123,
}


def _truth() -> xr.Dataset:
    return synthetic_dataset(times=10, levels=(500, 850), upper_variables=("geopotential",), surface_variables=("2m_temperature",))


def _store(ds: xr.Dataset, path: Path) -> str:
    # Every chunk on disk, NaN ones too: a store with missing chunks is refused as incomplete.
    ds.to_zarr(path, mode="w", consolidated=False, write_empty_chunks=True)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("report-inputs")
    truth = _truth()
    hybrid = synthetic_forecast(truth, n_inits=3, weight_samples=3, draws=2).assign_attrs(HYBRID_ATTRS)
    reference = synthetic_forecast(truth, n_inits=4, weight_samples=5, draws=1, design=False, seed=2)
    deterministic = synthetic_forecast(truth, n_inits=3, weight_samples=1, draws=1, design=False, seed=3).isel(number=0, drop=True)
    nan_t2m = reference.assign(**{"2m_temperature": reference["2m_temperature"] * np.nan})
    return {
        "truth": _store(truth, root / "truth.zarr"),
        "hybrid": _store(hybrid, root / "hybrid.zarr"),
        "reference": _store(reference, root / "reference.zarr"),
        "deterministic": _store(deterministic, root / "det.zarr"),
        "coarse": _store(synthetic_forecast(synthetic_dataset(grid="240x121", times=6, levels=(500,), upper_variables=("geopotential",), surface_variables=("2m_temperature",)), n_inits=2), root / "coarse.zarr"),
        "late": _store(reference.assign_coords(time=reference.time + np.timedelta64(30, "D")), root / "late.zarr"),
        "nan_t2m": _store(nan_t2m, root / "nan.zarr"),
    }


@pytest.fixture(scope="module")
def report(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "rep"
    args = ["-q", "report", "--truth", stores["truth"], "--out", str(out), "--fields", *FIELDS, "--forecasts"]
    assert main([*args, *(f"{n}={stores[n]}" for n in ("hybrid", "reference", "deterministic"))]) == 0
    return out


def test_report_has_every_section_and_the_tables_agree_with_evaluate(report, stores):
    html = (report / "report.html").read_text()
    for section in ("systems", "geopotential_500", "2m_temperature", "decomposition", "checks", "cost", "provenance", "metrics"):
        assert f'id="{section}"' in html
    # 5 figures per field (skill, rank, reliability, spread-error, spectra) + the share + one map per field for the hybrid.
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 5 * 2 + 1 + 2
    assert "<script" not in html and "http" not in html.split("</style>")[1]  # self-contained
    assert json.loads((report / MARKER).read_text())["kind"] == "report"

    cost = pd.read_csv(report / "cost.csv").set_index("system")
    assert cost.loc["hybrid", "network_evaluations_per_member_step"] == "2.0"
    assert cost.loc["reference", "wall_seconds_per_member_step"] == "not recorded"
    assert cost.loc["deterministic", "members"] == 1
    provenance = pd.read_csv(report / "provenance.csv").set_index("system")
    assert provenance.loc["hybrid", "command"] == HYBRID_ATTRS["command"]
    assert provenance.loc["hybrid", "checkpoints"] == "vi_6h: " + "ab" * 8
    assert provenance.loc["reference", "seed"] == "not recorded"
    assert "&#34;amplitude&#34;: 0.9" in html or "&quot;amplitude&quot;: 0.9" in html

    checks = pd.read_csv(report / "checks.csv").set_index(["system", "field"])
    for field in ("geopotential 500 hPa", "2m_temperature"):
        assert checks.loc[("hybrid", field), "total_variance_verdict"] == "holds (rounding level)"
        assert float(checks.loc[("hybrid", field), "total_variance"]) < 1e-6
        assert checks.loc[("hybrid", field), "mixture_crps_verdict"] == "holds"
        assert checks.loc[("reference", field), "mixture_crps_verdict"] == "needs a K × J design"
        assert checks.loc[("deterministic", field), "calibration_verdict"] == "needs an ensemble"

    # The CSV scores are those of `bdlens evaluate` on the init times all systems share.
    scores = pd.read_csv(report / "scores.csv")
    truth = xr.open_zarr(stores["truth"], consolidated=False)
    hybrid_ds = xr.open_zarr(stores["hybrid"], consolidated=False)
    reference = evaluate({"hybrid": hybrid_ds[["2m_temperature"]]}, truth[["2m_temperature"]], metrics=["crps"])
    got = scores[(scores.forecast == "hybrid") & (scores.metric == "crps") & (scores.variable == "2m_temperature")].sort_values("lead_hours")
    np.testing.assert_allclose(got.value.values, reference["2m_temperature"].sel(forecast="hybrid", metric="crps").values, rtol=1e-9)
    det = scores[(scores.forecast == "deterministic") & (scores.metric == "crps_standard")]
    assert len(det) and det.value.notnull().all()


@pytest.mark.parametrize(
    ("forecasts", "message"),
    [
        (["hybrid", "coarse"], "systems on different grids: hybrid is 64x32, coarse is 240x121"),
        (["late"], "no valid time"),
        (["hybrid", "late"], "share no initialisation time"),
        (["reference", "nan_t2m"], "only NaN in 2m_temperature of nan_t2m"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(stores, tmp_path, capsys, forecasts, message):
    out = tmp_path / "rep"
    args = ["-q", "report", "--truth", stores["truth"], "--out", str(out), "--forecasts", *(f"{n}={stores[n]}" for n in forecasts)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_directory_rules(stores, report, tmp_path, capsys):
    base = ["-q", "report", "--truth", stores["truth"], "--fields", "2m_temperature", "--forecasts", f"hybrid={stores['hybrid']}"]
    assert main([*base, "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err and "--resume" not in err, err  # report has no --resume
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*base, "--out", str(foreign), "--overwrite"]) == 2
    assert "was not written by bdlens" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main([*base, "--out", stores["hybrid"]]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main([*base[:-2], "--forecasts", "hybrid", "--out", str(tmp_path / "new")]) == 2
    assert "write NAME=PATH" in capsys.readouterr().err
    # --overwrite replaces an earlier report, but only once the new one is complete.
    copy = tmp_path / "copy"
    shutil.copytree(report, copy)
    assert main([*base, "--out", str(copy), "--overwrite"]) == 0
    assert 'id="geopotential_500"' not in (copy / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*partial*"))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Injected at the top of a copy of the page: records console errors, uncaught errors and failed
# loads from the start, and after the load event writes them and every image's size into the DOM.
PROBE = """<script>
window.__errors = [];
const __error = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __error(...a); };
window.addEventListener('error', e => window.__errors.push(e.message || ('failed to load ' + (e.target.src || e.target.href))), true);
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width, ok: i.complete}));
  document.documentElement.setAttribute('data-probe', JSON.stringify({errors: window.__errors, images}));
});
</script>"""


@pytest.mark.skipif(os.environ.get("BDLENS_SKIP_BROWSER") == "1", reason="BDLENS_SKIP_BROWSER=1")
def test_page_renders_in_headless_chromium_without_errors(report, tmp_path):
    browser = _chromium()
    assert browser, "headless Chromium is needed (`apt-get install chromium`, done by .ci/run); set BDLENS_SKIP_BROWSER=1 to skip"
    html = (report / "report.html").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--window-size=1400,1000",
               "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(re.search(r'data-probe="([^"]*)"', done.stdout).group(1).replace("&quot;", '"'))
    assert probe["errors"] == []
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []
    images = probe["images"]
    assert len(images) == len(re.findall(r"<img ", html)) and len(images) >= 10
    assert all(i["ok"] and i["w"] > 100 and i["h"] > 100 and i["shown"] > 100 for i in images), images


def test_every_system_of_a_large_comparison_gets_its_own_colour() -> None:
    from matplotlib.colors import to_rgba

    from bdlens.report.figures import colours

    for n in (3, 10, 12, 20):
        rgba = [to_rgba(c) for c in colours([f"s{i}" for i in range(n)]).values()]
        assert len(set(rgba)) == n
