"""The diffusion baseline as a member source (:class:`bdlens.ensemble.base.MemberSource`; docs/diffusion.md).

Every member runs the Heun sampler of a ``bdlens train diffusion`` checkpoint at every step:
2N − 1 network evaluations per member and step. Member m of the forecast with init key i draws all
noise of the step producing lead L from the generator of (seed, ``"diffusion"``, m, L, i)
(:mod:`bdlens.streams`), so its values do not depend on the batch it is computed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bdlens.data import FieldLayout, Fields, NormStats
from bdlens.ensemble.base import Forecast, History
from bdlens.errors import BdlensError
from bdlens.models.diffusion import Denoiser, DiffusionSampler, ResidualScaling, SamplerSettings, load_diffusion
from bdlens.models.lead_time import Call
from bdlens.models.pretrained import layout_of


@dataclass
class DiffusionModel:
    """One step model's denoiser with what it needs on physical fields (``model.config`` is the forecast model's)."""

    model: Denoiser
    layout: FieldLayout
    stats: NormStats
    sampler: DiffusionSampler


class DiffusionMembers:
    """Members sampled by the diffusion model of ``directory``; ``sampler`` overrides the checkpoint's
    default Heun settings (steps, churn)."""

    def __init__(self, directory: str | Path, seed: int, sampler: SamplerSettings | None = None, device: str | torch.device = "cpu") -> None:
        denoiser, manifest = load_diffusion(directory, device)
        layout = layout_of(denoiser.config, directory)
        stats = NormStats.from_dict(manifest["norm_stats"])
        scaling = ResidualScaling(layout, stats, NormStats.from_dict(manifest["residual_stats"])).to(device)
        settings = sampler or SamplerSettings.model_validate(manifest.get("sampler", {}))
        step = denoiser.config.step_hours
        self.models = {step: DiffusionModel(denoiser, layout, stats, DiffusionSampler(denoiser, scaling, settings, seed))}
        self.steps = (step,)
        self.n_input_times = denoiser.config.n_input_times
        self.network_evaluations = settings.network_evaluations
        self.settings = settings
        self.forecast = Forecast(0, ())

    def start(self, forecast: Forecast) -> None:
        self.forecast = forecast

    def initial(self, history: History) -> History:
        return history

    def step(self, previous: Fields | None, current: Fields, call: Call) -> Fields:
        if call.step not in self.models:
            raise BdlensError(f"this diffusion model steps {self.steps[0]} h, not {call.step} h")
        model = self.models[call.step]
        norm = lambda f: None if f is None else model.layout.normalise(f, model.stats)  # noqa: E731
        rows = [(m, self.forecast.init_key) for m in self.forecast.members]
        out, _ = model.sampler.sample(norm(previous), norm(current), rows, call.lead)
        return model.layout.denormalise(out, model.stats)

    def describe(self) -> str:
        churn = f", churn {self.settings.churn:g}" if self.settings.churn else ""
        return f"diffusion (Heun, {self.settings.steps} steps{churn})"
