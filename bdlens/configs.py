"""Locating the YAML configs that ship with the package (``bdlens/assets/configs``; the repository's
``configs/`` links there), and reading them; paths as manifests record them (portable between machines).

The configs live inside the package so that a wheel (non-editable) install finds them: the bundled
system's calibration names its scheme config (``ensemble.json``), which ``bdlens ensemble`` reads.
Manifests record them as ``configs/NAME.yaml`` however bdlens is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from bdlens.errors import BdlensError, validation_error

CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "configs"
REPOSITORY = Path(__file__).resolve().parent.parent
CONFIGS = "configs"  # how manifests write CONFIG_DIR
CACHE = "$BDLENS_CACHE_DIR"  # how manifests write the bdlens cache directory


def default_cache_dir() -> Path:
    """``$BDLENS_CACHE_DIR`` or ``~/.cache/bdlens``."""
    return Path(os.environ.get("BDLENS_CACHE_DIR", Path.home() / ".cache" / "bdlens"))


def portable_path(path: str | Path) -> str:
    """``path`` as a manifest records it, without the absolute paths of the machine that wrote it:
    ``$BDLENS_CACHE_DIR/…`` inside the bdlens cache (demo worlds), ``configs/…`` for the shipped configs,
    else relative to the repository (``bdlens/assets/…``, ``runs/…``), else to the working directory
    (where the command ran); anything else as given. :func:`resolve_portable` reads it back."""
    resolved = Path(path).resolve()
    roots = ((default_cache_dir().resolve(), CACHE), (CONFIG_DIR, CONFIGS), (REPOSITORY, None), (Path.cwd(), None))
    for root, prefix in roots:
        if resolved.is_relative_to(root):
            relative = resolved.relative_to(root).as_posix()
            return relative if prefix is None else f"{prefix}/{relative}"
    return str(path)


def resolve_portable(recorded: str) -> Path:
    """The local path of a :func:`portable_path`: ``$BDLENS_CACHE_DIR/…`` in this machine's cache, a
    relative path from the working directory, else ``configs/…`` from the shipped configs, else from
    the repository."""
    if recorded == CACHE or recorded.startswith(f"{CACHE}/"):
        return default_cache_dir() / recorded.removeprefix(CACHE).lstrip("/")
    path = Path(recorded)
    if not path.exists() and recorded.startswith(f"{CONFIGS}/"):
        return CONFIG_DIR / recorded.removeprefix(f"{CONFIGS}/")
    if path.is_absolute() or path.exists() or not (REPOSITORY / path).exists():
        return path
    return REPOSITORY / path


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a config given as a path, or as a name of a shipped config (``vi_demo``, ``configs/vi_demo.yaml``;
    ".yaml" optional)."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    name = str(name_or_path).removeprefix(f"{CONFIGS}/")
    for path in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise BdlensError(f"config {name_or_path!s} not found as a file nor in {CONFIG_DIR} (known: {', '.join(known) or 'none'})")


class YamlConfig(BaseModel):
    """A frozen pydantic config read from YAML by :meth:`from_yaml` (``what`` names it in errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    what: ClassVar[str] = "config"

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Load and validate a YAML file; problems become one :class:`BdlensError` line."""
        path = Path(path)
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError) as err:
            raise BdlensError(f"cannot read {cls.what} {path}: {err}".replace("\n", " ")) from None
        except ValidationError as err:
            raise validation_error(str(path), err) from None
