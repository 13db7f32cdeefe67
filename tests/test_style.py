"""The code passes the project's lint rules (pyproject.toml [tool.ruff]: pyflakes and import order)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: install the test extra (bash scripts/install.sh test)"
    result = subprocess.run([ruff, "check", "--no-cache", "bdlens", "tests", "benchmarks", "evaluation", "examples"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
