"""The scripts under examples/ run end to end (tiny settings) on the session's small world."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epistemic_spread_example(small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("BDLENS_CACHE_DIR", str(small_world.parent))  # reuse the session's world, build nothing
    example = _load("epistemic_spread")
    assert example.main(["--members", "3", "--inits", "1", "--lead-hours", "6", "24", "--map", str(tmp_path / "map.png")]) == 0
    out = capsys.readouterr().out
    assert "geopotential" in out and "spread" in out and "crps" in out
    assert (tmp_path / "map.png").stat().st_size > 10_000


def test_uncertainty_report_example(small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("BDLENS_CACHE_DIR", str(small_world.parent))
    example = _load("uncertainty_report")
    assert example.main(["--weight-samples", "2", "--draws", "2", "--inits", "1", "--lead-hours", "6", "12", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    identity = float(out.split("total^2 to ")[1].split()[0])
    assert identity < 1e-10 and "+ 12 h" in out
    assert (tmp_path / "z500_uncertainty.png").stat().st_size > 10_000
    html = (tmp_path / "report" / "report.html").read_text()
    assert "hybrid" in html and "posterior" in html and 'id="decomposition"' in html
