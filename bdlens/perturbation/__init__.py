"""Aleatoric perturbations (docs/science.md §5): random patterns on the sphere (:mod:`.patterns`), SPPT on the
network's tendency with physical constraints (:mod:`.sppt`), initial-condition perturbations
(:mod:`.initial`), the learned CRPS-trained perturbation network (:mod:`.learned`, ``bdlens train
perturb``) and amplitude calibration (:mod:`.calibrate`, ``bdlens calibrate``)."""

from bdlens.perturbation.initial import BredVectors, bred_vectors, gaussian_perturbation, random_field_perturbation, rms_norm
from bdlens.perturbation.patterns import SPPT_SCALES, PatternScale, PatternState, SphericalPattern, UnresolvedScaleWarning
from bdlens.perturbation.sppt import SPPT, SPPTConfig, VerticalTaper, apply_sppt, load_sppt_config

__all__ = [
    "SPPT",
    "SPPT_SCALES",
    "BredVectors",
    "PatternScale",
    "PatternState",
    "SPPTConfig",
    "SphericalPattern",
    "UnresolvedScaleWarning",
    "VerticalTaper",
    "apply_sppt",
    "bred_vectors",
    "gaussian_perturbation",
    "load_sppt_config",
    "random_field_perturbation",
    "rms_norm",
]
