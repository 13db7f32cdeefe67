"""The data configuration (YAML, validated with pydantic): fields, step Δ and train/val/test time ranges.

Example (``configs/data_demo.yaml``)::

    upper_variables: [geopotential, temperature]
    surface_variables: [mean_sea_level_pressure]
    levels: [500, 850]
    step: 6h              # Δ: any multiple of the data's time step ("24h", "1d", 6 → hours)
    input_steps: 2        # X_{t−Δ}, X_t → X_{t+Δ}; 1 for the original Pangu-Weather
    splits:
      train: {start: 2000-01-01, end: 2001-12-31}   # inclusive; a date-only end means the whole day
      val:   {start: 2002-01-01, end: 2002-06-30}
      test:  {start: 2002-07-01, end: 2002-12-31}
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from bdlens.errors import BdlensError, validation_error


def _parse_time(value: Any, end_of_day: bool) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    date_only = isinstance(value, dt.date) or (isinstance(value, str) and len(value.strip()) == 10)
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{value!r} is not a date/time (use e.g. 2000-01-01 or 2000-01-01T06:00)") from err
    if date_only and end_of_day:
        stamp = stamp + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    return stamp.tz_localize(None).to_pydatetime() if stamp.tzinfo else stamp.to_pydatetime()


class TimeRange(BaseModel):
    """An inclusive time range; an ``end`` given as a date covers that whole day."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: dt.datetime
    end: dt.datetime

    @field_validator("start", "end", mode="before")
    @classmethod
    def _parse(cls, value: Any, info: ValidationInfo) -> dt.datetime:
        return _parse_time(value, end_of_day=info.field_name == "end")

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def bounds(self) -> tuple[np.datetime64, np.datetime64]:
        """(start, end) as datetime64[ns], both inclusive."""
        return np.datetime64(self.start, "ns"), np.datetime64(self.end, "ns")


class DataConfig(BaseModel):
    """Which fields a model trains on, the step Δ, the number of input times and the time splits.

    ``path`` (and ``constants_path``, for time-independent fields kept in another store) are read
    relative to the working directory; ``constant_variables`` default to the data store itself.
    """

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    upper_variables: list[str]
    surface_variables: list[str]
    levels: list[int]
    constant_variables: list[str] = []
    constants_path: str | None = None
    step: dt.timedelta = dt.timedelta(hours=6)
    input_steps: int = 2
    splits: dict[str, TimeRange]

    @field_validator("step", mode="before")
    @classmethod
    def _parse_step(cls, value: Any) -> dt.timedelta:
        if isinstance(value, int | float):
            value = pd.Timedelta(hours=value)
        try:
            step = pd.Timedelta(value).to_pytimedelta()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{value!r} is not a time step (use e.g. 6h, 24h, 1d)") from err
        if step <= dt.timedelta(0):
            raise ValueError(f"step must be positive, got {value!r}")
        return step

    @field_validator("input_steps")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("input_steps must be at least 1")
        return value

    @field_validator("upper_variables", "surface_variables", "levels", "constant_variables")
    @classmethod
    def _unique(cls, value: list) -> list:
        duplicated = sorted({str(v) for v in value if value.count(v) > 1})
        if duplicated:
            raise ValueError(f"duplicated entries {duplicated}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not (self.upper_variables or self.surface_variables):
            raise ValueError("no variables: list upper_variables and/or surface_variables")
        if self.upper_variables and not self.levels:
            raise ValueError("upper_variables need levels")
        if "train" not in self.splits:
            raise ValueError(f"splits need a 'train' range (got {sorted(self.splits)})")
        ranges = sorted(self.splits.items(), key=lambda item: item[1].start)
        for (name_a, a), (name_b, b) in zip(ranges, ranges[1:]):
            if b.start <= a.end:
                raise ValueError(f"splits {name_a} and {name_b} overlap ({name_b} starts {b.start}, {name_a} ends {a.end})")
        return self

    @property
    def step_timedelta(self) -> np.timedelta64:
        """Δ as timedelta64[ns]."""
        return np.timedelta64(self.step, "ns")


def period_inits(times: np.ndarray, bounds: tuple[np.datetime64, np.datetime64], max_lead_hours: int, every_hours: int) -> np.ndarray:
    """Forecast inits among ``times`` (datetime64) in a period (``bounds``: its first and last time):
    every ``every_hours`` from its first time a day after the start (a day of history), each with
    ``max_lead_hours`` of the period after it; empty when none fits."""
    start, end = bounds
    times = np.asarray(times)
    times = times[(times >= start + np.timedelta64(24, "h")) & (times <= end - np.timedelta64(max_lead_hours, "h"))]
    if len(times) == 0:
        return times
    return times[(times - times[0]) % np.timedelta64(every_hours, "h") == np.timedelta64(0)]


def load_data_config(path: str | Path) -> DataConfig:
    """Read and validate a data YAML config; every problem becomes one :class:`BdlensError` line naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise BdlensError(f"{path}: no such config file; see configs/data_demo.yaml for an example") from err
    except (yaml.YAMLError, ValueError) as err:  # PyYAML raises ValueError for impossible dates such as 2000-13-01
        raise BdlensError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(raw, dict):
        raise BdlensError(f"{path}: expected a mapping of settings at the top level; see configs/data_demo.yaml")
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_error(f"{path}: invalid data config", err) from err
