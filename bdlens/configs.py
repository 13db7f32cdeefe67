"""Locating the YAML configs that ship in the repository's ``configs/`` folder."""

from __future__ import annotations

from pathlib import Path

from bdlens.errors import BdlensError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a config given as a path, or as a bare name of a file in ``configs/`` (".yaml" optional)."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    for path in (CONFIG_DIR / candidate, CONFIG_DIR / f"{candidate}.yaml"):
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise BdlensError(f"config {name_or_path!s} not found as a file nor in {CONFIG_DIR} (known: {', '.join(known) or 'none'})")
