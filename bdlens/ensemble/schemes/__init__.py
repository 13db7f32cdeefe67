"""Perturbation schemes: each wraps a member source (:class:`bdlens.ensemble.base.Wrapped`).

A scheme is one module here with a ``build(inner, context) -> MemberSource`` function, registered
by name in :data:`SCHEMES`; ``bdlens ensemble --perturbation NAME`` and
:meth:`bdlens.ensemble.Forecaster.ensemble` pick it from there. ``context`` carries what a scheme may
need (:class:`SchemeContext`). The amplitude multiplies the scheme's spread (calibrated per scheme
by ``bdlens calibrate``), and a scheme perturbing every step scales it further by the calibrated
per-lead factor of the call (:meth:`SchemeContext.lead_factor`); see docs/ensemble.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bdlens.data import FieldLayout, NormStats
from bdlens.ensemble.base import MemberSource
from bdlens.errors import BdlensError


@dataclass(frozen=True)
class SchemeContext:
    """What a scheme is built from: the run seed, its amplitude and per-lead factors (lead hours →
    factor), the fields, each step model's normalisation statistics, the checkpoint directories it
    may read, and its settings."""

    seed: int
    amplitude: float
    layout: FieldLayout
    stats: Mapping[int, NormStats]
    checkpoints: Mapping[str, Path] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    lead_factors: Mapping[int, float] = field(default_factory=dict)

    def lead_factor(self, lead_hours: int) -> float:
        """The factor on the amplitude of a call ending at ``lead_hours``: linear in lead between the
        calibrated leads, the nearest calibrated lead's beyond them, 1 without a per-lead calibration."""
        if not self.lead_factors:
            return 1.0
        leads = sorted(self.lead_factors)
        return float(np.interp(lead_hours, leads, [self.lead_factors[h] for h in leads]))

    def describe_amplitude(self) -> str:
        """The amplitude as a run's ``system`` attribute shows it, e.g. ``"amplitude 1.46 × 1 … 0.32 to 240 h"``
        (the factors' range in lead order and their last lead; the store's ``config`` attribute has them all)."""
        text = f"amplitude {self.amplitude:.3g}"
        if self.lead_factors:
            leads = sorted(self.lead_factors)
            text += f" × {self.lead_factors[leads[0]]:.3g} … {self.lead_factors[leads[-1]]:.3g} to {leads[-1]} h"
        return text


# name → module defining ``build(inner, context)``; imported on use (the learned scheme loads torch modules
# the others do not need).
SCHEMES: dict[str, str] = {
    "sppt": "bdlens.ensemble.schemes.sppt",
    "learned": "bdlens.ensemble.schemes.learned",
    "ic": "bdlens.ensemble.schemes.initial",
    "bred": "bdlens.ensemble.schemes.bred",
}


def build_scheme(name: str, inner: MemberSource, context: SchemeContext) -> MemberSource:
    """``inner`` wrapped in the registered scheme ``name`` (``"none"`` returns ``inner``)."""
    if name == "none":
        return inner
    if name not in SCHEMES:
        raise BdlensError(f"unknown perturbation {name!r}; choose one of: none, {', '.join(sorted(SCHEMES))}")
    return importlib.import_module(SCHEMES[name]).build(inner, context)
