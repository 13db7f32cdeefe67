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


# The pipeline's stages in order (README "Layout"); training/ and cli/ sit beside them and may use any
# stage, but no stage may use them. Top-level helper modules (errors, grid, streams, devices, ...) use none.
STAGES = ("world", "data", "models", "bayes", "perturbation", "ensemble", "metrics", "report")
BESIDE = ("training", "cli", "__main__")
LEVEL = {"evaluate": "metrics", "uncertainty": "metrics"}  # top-level modules that belong to a stage


def _bdlens_imports(path: Path) -> set[str]:
    """The ``bdlens.<part>`` every import of ``path`` names (module level and inside functions)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        names |= {m.split(".")[1] for m in modules if m.startswith("bdlens.")}
    return names


def test_no_stage_imports_a_later_stage_or_the_trainers() -> None:
    package = ROOT / "bdlens"
    wrong = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        own = parts[0] if len(parts) > 1 else LEVEL.get(path.stem, path.stem)
        if own in BESIDE:
            continue
        for used in _bdlens_imports(path):
            used = LEVEL.get(used, used)
            later = used in STAGES and (own not in STAGES or STAGES.index(used) > STAGES.index(own))
            if later or used in BESIDE:
                wrong.append(f"{path.relative_to(ROOT)} imports bdlens.{used}")
    assert not wrong, "\n".join(sorted(wrong))
