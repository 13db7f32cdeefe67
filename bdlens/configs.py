"""Locating the YAML configs that ship in the repository's ``configs/`` folder, and reading them."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from bdlens.errors import BdlensError, validation_error

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
