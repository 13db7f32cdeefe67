"""Configuration of the 3D Earth-Specific Transformer (docs/science.md §3), validated with pydantic.

A configuration fixes the variables, levels and grid the network sees, the number of input times,
and every size of the backbone (channels, depths, heads, window, patch). :meth:`ModelConfig.from_yaml`
loads one from YAML and turns every validation problem into a one-line :class:`BdlensError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bdlens.errors import BdlensError, validation_error
from bdlens.grid import GRIDS, SURFACE_VARIABLES, UPPER_AIR_VARIABLES, WB2_LEVELS


class ModelConfig(BaseModel):
    """Every size and variable list of one 3DEST.

    ``depths`` and ``heads`` list the four stages in order: encoder stage 1 (``embed_dim`` channels),
    encoder stage 2 (2×), decoder stage 2 (2×), decoder stage 1 (``embed_dim``). ``window`` and
    ``patch`` are (pressure, latitude, longitude) sizes in tokens and grid points. ``residual`` makes
    the network predict the increment X_{t+Δ} − X_t (original Pangu-Weather: false).

    ``convention`` fixes how tokens are laid out inside the network (docs/science.md §3): ``"pangu"`` (the
    default) feeds the levels from the ground up (1000 → 50 hPa), so the surface token shares its
    vertical window with the near-surface levels, and rolls shifted windows by +half a window, as
    Pangu-Weather's pseudocode does; ``"legacy"`` is the convention of checkpoints written before this
    field existed (levels in ascending hPa, the surface token beside the top level, rolled by −half a
    window). :meth:`from_manifest` resolves a stored config without the field to ``"legacy"``.

    ``conditioning_dim`` > 0 turns every block's layer norms into adaptive layer norms driven by a
    conditioning vector of that width (the diffusion denoiser's noise embedding,
    :mod:`bdlens.models.diffusion`); such a denoiser takes a third input, the noisy state. 0 (the
    default) is the plain 3DEST, so existing checkpoints load unchanged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    upper_variables: tuple[str, ...]
    levels: tuple[int, ...]
    surface_variables: tuple[str, ...]
    constants: tuple[str, ...] = ()
    grid: str | None = None
    nlat: int = Field(gt=0)
    nlon: int = Field(gt=0)
    n_input_times: int = Field(default=2, ge=1, le=3)
    step_hours: int = Field(default=6, gt=0)
    embed_dim: int = Field(gt=0)
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    window: tuple[int, int, int]
    patch: tuple[int, int, int]
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    residual: bool = False
    checkpoint: bool = False
    convention: Literal["pangu", "legacy"] = "pangu"
    conditioning_dim: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _grid_sizes(cls, data: Any) -> Any:
        # A named grid fills nlat/nlon so that YAML files can say `grid: 64x32` only.
        if isinstance(data, dict) and data.get("grid") is not None:
            name = data["grid"]
            if name not in GRIDS:
                raise ValueError(f"unknown grid {name!r}; use one of {sorted(GRIDS)} or give nlat/nlon")
            grid = GRIDS[name]
            for key, size in (("nlat", grid.nlat), ("nlon", grid.nlon)):
                if data.get(key, size) != size:
                    raise ValueError(f"{key}={data[key]} contradicts grid {name} ({key}={size})")
            data = {**data, "nlat": grid.nlat, "nlon": grid.nlon}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        unknown = set(self.upper_variables) - set(UPPER_AIR_VARIABLES)
        if unknown:
            raise ValueError(f"unknown upper-air variables {sorted(unknown)}; use names from {UPPER_AIR_VARIABLES}")
        unknown = set(self.surface_variables) - set(SURFACE_VARIABLES)
        if unknown:
            raise ValueError(f"unknown surface variables {sorted(unknown)}; use names from {SURFACE_VARIABLES}")
        for names, known in ((self.upper_variables, UPPER_AIR_VARIABLES), (self.surface_variables, SURFACE_VARIABLES)):
            # bdlens.data lays channels out in this order; any other order would silently swap fields.
            if list(names) != sorted(names, key=known.index):
                raise ValueError(f"list {list(names)} in the canonical order of {known}")
        if self.n_input_times == 3 and not self.conditioning_dim:
            raise ValueError("n_input_times must be 1 or 2 (3 only for a noise-conditioned diffusion denoiser)")
        if not self.upper_variables or not self.surface_variables or not self.levels:
            raise ValueError("upper_variables, surface_variables and levels must not be empty")
        if list(self.levels) != sorted(set(self.levels)) or not set(self.levels) <= set(WB2_LEVELS):
            raise ValueError(f"levels must be distinct WB2 levels {WB2_LEVELS} in ascending hPa order")
        if min(self.window + self.patch) < 1 or min(self.depths) < 1 or min(self.heads) < 1:
            raise ValueError("window, patch, depths and heads must all be positive")
        pw, ww = self.patch[2], self.window[2]
        if self.nlon % pw:
            raise ValueError(f"patch longitude size {pw} must divide nlon={self.nlon}: longitude is never padded")
        lon1 = self.nlon // pw
        if lon1 % 2 or lon1 % ww or (lon1 // 2) % ww:
            raise ValueError(
                f"window longitude size {ww} must divide the longitude token counts {lon1} (stage 1) and "
                f"{lon1 // 2} (stage 2; so {lon1} must be even): longitude is never padded"
            )
        dims = (self.embed_dim, 2 * self.embed_dim, 2 * self.embed_dim, self.embed_dim)
        for stage, (dim, heads) in enumerate(zip(dims, self.heads, strict=True), start=1):
            if dim % heads:
                raise ValueError(f"stage {stage}: {heads} heads do not divide its {dim} channels")
        return self

    @property
    def n_upper(self) -> int:
        """Number of upper-air variables V_u."""
        return len(self.upper_variables)

    @property
    def n_surface(self) -> int:
        """Number of surface variables V_s."""
        return len(self.surface_variables)

    @property
    def n_levels(self) -> int:
        """Number of pressure levels Z."""
        return len(self.levels)

    def token_shape(self, stage: int) -> tuple[int, int, int]:
        """(pressure, latitude, longitude) token counts of stage 1 or 2; the surface is pressure token 0."""
        pz, ph, pw = self.patch
        z = math.ceil(self.n_levels / pz) + 1
        h = math.ceil(self.nlat / ph)
        w = self.nlon // pw
        if stage == 2:
            return z, math.ceil(h / 2), w // 2
        return z, h, w

    def drop_path_rates(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """Per-block DropPath rates of the four stages, rising linearly over the encoder up to
        ``drop_path`` and mirrored in the decoder (as in Pangu-Weather)."""
        d1, d2, d3, d4 = self.depths
        encoder = np.linspace(0.0, self.drop_path, d1 + d2).tolist()
        stage1, stage2 = encoder[:d1], encoder[d1:]
        return stage1, stage2, np.linspace(stage2[0], stage2[-1], d3).tolist(), np.linspace(0.0, stage1[-1], d4).tolist()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        """Validate a mapping; any problem becomes one :class:`BdlensError` line naming the fields."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise validation_error(source, err) from None

    @classmethod
    def from_manifest(cls, data: dict[str, Any], source: str) -> ModelConfig:
        """The ``model_config`` stored in a checkpoint manifest; one written before ``convention`` existed
        is a legacy model (see the class docstring), so that old checkpoints give the outputs they were
        trained to give."""
        if not isinstance(data, dict):
            raise BdlensError(f"{source}: model_config must be a mapping of model settings")
        return cls.from_dict({"convention": "legacy", **data}, source=source)

    @property
    def ground_up(self) -> bool:
        """Whether levels enter the network from the ground up (Pangu's order) rather than in ascending hPa."""
        return self.convention == "pangu"

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load and validate a YAML model configuration (top-level mapping or a ``model:`` section)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise BdlensError(f"cannot read model config {path}: {err}".replace("\n", " ")) from None
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = data["model"]
        if not isinstance(data, dict):
            raise BdlensError(f"model config {path} must be a YAML mapping of model settings")
        return cls.from_dict(data, source=str(path))
