"""The K × J member design and its variance split (docs/science.md, "Decomposition").

Members y_kj (k = weight sample, j = perturbation draw) split by a one-way random-effects ANOVA,
unbiased for any K, J ≥ 2:

    aleatoric  Â = mean_k s_k²                 (within-group variance, divisor J − 1)
    epistemic  Ê = s²(group means) − Â / J     (divisor K − 1; may be negative on small samples)
    total      = Ê + Â

This is the one implementation: the engine stores it per point, :func:`bdlens.uncertainty.decompose`
reduces it over space and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from bdlens.errors import BdlensError

WEIGHT_SAMPLE = "weight_sample"
PERTURBATION_DRAW = "perturbation_draw"


@dataclass(frozen=True)
class Design:
    """Members = K weight samples × J perturbation draws; member i is (k, j) = (i // J, i % J)."""

    weights: int
    draws: int

    def __post_init__(self) -> None:
        if self.weights < 1 or self.draws < 1:
            raise BdlensError(f"an ensemble needs at least one weight sample and one draw, got K={self.weights}, J={self.draws}")

    @classmethod
    def of(cls, members: int, weights: int) -> Design:
        """The design of ``members`` members with ``weights`` weight samples (members must be a multiple of it)."""
        if members < 1:
            raise BdlensError(f"--members must be at least 1, got {members}")
        if weights < 1 or members % weights:
            raise BdlensError(f"--members {members} is not a multiple of --weights {weights}; members = weights x perturbation draws")
        return cls(weights, members // weights)

    @property
    def members(self) -> int:
        """M = K·J."""
        return self.weights * self.draws

    def weight_sample(self, members: Sequence[int] | np.ndarray) -> np.ndarray:
        """k of each member index."""
        return np.asarray(members, dtype=np.int64) // self.draws

    def perturbation_draw(self, members: Sequence[int] | np.ndarray) -> np.ndarray:
        """j of each member index."""
        return np.asarray(members, dtype=np.int64) % self.draws


def anova(split: xr.DataArray) -> xr.Dataset:
    """(Ê, Â, Ê + Â) of members split into dims (``weight_sample``, ``perturbation_draw``); units² of the field."""
    draws = split.sizes[PERTURBATION_DRAW]
    aleatoric = split.var(PERTURBATION_DRAW, ddof=1, skipna=False).mean(WEIGHT_SAMPLE)
    epistemic = split.mean(PERTURBATION_DRAW, skipna=False).var(WEIGHT_SAMPLE, ddof=1, skipna=False) - aleatoric / draws
    return xr.Dataset({"epistemic": epistemic, "aleatoric": aleatoric, "total": epistemic + aleatoric})


def split_members(forecast: xr.DataArray, draws: int, member_dim: str = "number") -> xr.DataArray:
    """Members ordered k-major (member i = (i // J, i % J), as the engine writes them) as dims (K, J), lazily."""
    return forecast.coarsen({member_dim: draws}).construct({member_dim: (WEIGHT_SAMPLE, PERTURBATION_DRAW)})
