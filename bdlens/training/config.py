"""Training configuration (YAML under ``configs/``), validated on load."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bdlens.configs import config_path
from bdlens.devices import Device, Precision
from bdlens.errors import BdlensError, validation_error


class ExecutionSettings(BaseModel):
    """Where and how a trainer computes (docs/gpu.md); none of them changes a CPU fp32 result, and a
    resumed run may change any of them (:func:`execution_fields`)."""

    device: Device = Field("auto", description="auto (CUDA when present), cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    precision: Precision = Field("fp32", description="bf16: forward passes and losses under bfloat16 autocast")
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes preparing the next batches (0: in the training process)"
    )


def execution_fields(prefix: str = "") -> tuple[str, ...]:
    """The dotted names of the :class:`ExecutionSettings` fields under ``prefix`` (e.g. ``"training."``),
    for an objective's ``may_change``: a run saved on a GPU may resume on the CPU and the other way round."""
    return tuple(prefix + name for name in ExecutionSettings.model_fields)


class TrainConfig(ExecutionSettings):
    """Optimisation settings of the deterministic trainer, plus which model, data and world to use,
    and where it computes (:class:`ExecutionSettings`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model config: path or name in configs/")
    data: str = Field(description="data config: path or name in configs/")
    world: str = Field("demo", description="'demo' (the cached default demo world), 'small', or a path to a WB2 zarr")
    step_hours: int = Field(6, gt=0, description="Δ of this model; overrides the data and model configs")
    batch_size: int = Field(8, gt=0, description="global batch (split across DDP ranks)")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    steps: int = Field(1000, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    val_every: int = Field(200, gt=0)
    val_samples: int = Field(64, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    analysis_input_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="chance that each input time comes from the analysis (truth + analysis error) instead of the truth",
    )
    analysis: str | None = Field(
        None, description="analysis store for those inputs; default: analysis.zarr beside the (demo world) truth"
    )
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice)")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


def load_train_config(name_or_path: str | Path, kind: type[TrainConfig] = TrainConfig) -> tuple[TrainConfig, Path]:
    """The validated training config (of class ``kind``, e.g. the diffusion trainer's) and the file it came from."""
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BdlensError(f"training config {path} is not valid YAML: {err}".replace("\n", " ")) from err
    try:
        return kind.model_validate(raw), path
    except ValidationError as err:
        raise validation_error(f"training config {path}", err) from err
