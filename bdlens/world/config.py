"""Settings of the demo world, validated on load (YAML under ``configs/``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bdlens.errors import BdlensError, validation_error
from bdlens.grid import WB2_LEVELS

# Bumped whenever the world's on-disk layout or numerics change, so old caches are never reused.
WORLD_FORMAT_VERSION = 1


class AnalysisErrorConfig(BaseModel):
    """The balanced, spatially correlated analysis-error model (see ``analysis_error.py``)."""

    model_config = ConfigDict(extra="forbid")

    wind_std_ms: float = Field(1.5, gt=0, description="grid-point std of the rotational wind error, m/s")
    correlation_length_km: float = Field(800.0, gt=0, description="horizontal correlation length L, km")
    vertical_length_log_sigma: float = Field(
        0.5, gt=0, description="vertical correlation length of the stream-function error, in ln(sigma)"
    )


class WorldConfig(BaseModel):
    """Everything that determines a demo world; its hash names the cache entry."""

    model_config = ConfigDict(extra="forbid")

    truncation: Literal[21, 31, 42] = Field(21, description="spectral truncation (T21 → 64×32 Gaussian grid)")
    layers: int = Field(12, ge=8, le=32, description="equidistant sigma layers")
    time_step_minutes: float = Field(30.0, gt=0, le=60)
    spinup_days: float = Field(200.0, ge=0, description="discarded spin-up from rest, days")
    start: str = Field("2000-01-01T00", description="date label of the first saved time (after spin-up)")
    days: float = Field(1096.0, gt=0, description="saved length, days")
    output_hours: int = Field(6, ge=1, le=24, description="interval between saved states, hours")
    restart_hours: int = Field(12, ge=1, description="interval between saved restart states, hours")
    levels: list[int] = Field(default_factory=lambda: [100, 250, 400, 500, 600, 700, 850, 925])
    seed: int = 0
    analysis_error: AnalysisErrorConfig = Field(default_factory=AnalysisErrorConfig)

    @field_validator("levels")
    @classmethod
    def _wb2_levels(cls, levels: list[int]) -> list[int]:
        unknown = sorted(set(levels) - set(WB2_LEVELS))
        if unknown:
            raise ValueError(f"levels {unknown} are not WB2 pressure levels {list(WB2_LEVELS)}")
        if not {500, 850} <= set(levels):
            raise ValueError("levels must include 500 and 850 hPa")
        return sorted(set(levels))

    @field_validator("start")
    @classmethod
    def _valid_start(cls, start: str) -> str:
        try:
            np.datetime64(start, "h")
        except ValueError as err:
            raise ValueError(f"start {start!r} is not an ISO date-hour such as 2000-01-01T00") from err
        return start

    @model_validator(mode="after")
    def _consistent_intervals(self) -> WorldConfig:
        if (self.output_hours * 60) % self.time_step_minutes:
            raise ValueError("output_hours must be a whole number of model time steps")
        if self.restart_hours % self.output_hours:
            raise ValueError("restart_hours must be a multiple of output_hours")
        return self

    @property
    def n_times(self) -> int:
        """Number of saved times."""
        return int(round(self.days * 24 / self.output_hours))

    def times(self) -> np.ndarray:
        """Saved times as datetime64[ns], shape (n_times,)."""
        start = np.datetime64(self.start, "h").astype("datetime64[ns]")
        return start + np.arange(self.n_times) * np.timedelta64(self.output_hours, "h")

    def cache_key(self) -> str:
        """A short hash of the settings and the world format version."""
        payload = json.dumps({"format": WORLD_FORMAT_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_world_config(path: str | Path) -> WorldConfig:
    """Read and validate a world YAML file; errors name the file and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise BdlensError(f"world config {path} does not exist; pass a YAML file such as configs/world_demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BdlensError(f"world config {path} is not valid YAML: {err}".replace("\n", " ")) from err
    try:
        return WorldConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_error(f"world config {path}", err) from err
