"""The 3D Earth-Specific Transformer backbone (docs/science.md §3), its loss and hierarchical temporal aggregation."""

from bdlens.models.config import ModelConfig
from bdlens.models.lead_time import Call, greedy_schedule, plan_rollout, rollout
from bdlens.models.loss import PANGU_VARIABLE_WEIGHTS, WeightedL1Loss, variable_weights, weighted_l1
from bdlens.models.transformer import EarthSpecificTransformer, count_parameters

__all__ = [
    "PANGU_VARIABLE_WEIGHTS",
    "Call",
    "EarthSpecificTransformer",
    "ModelConfig",
    "WeightedL1Loss",
    "count_parameters",
    "greedy_schedule",
    "plan_rollout",
    "rollout",
    "variable_weights",
    "weighted_l1",
]
