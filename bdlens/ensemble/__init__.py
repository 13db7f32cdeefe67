"""The ensemble stage: member sources behind one protocol, the K × J design, the rollout engine and its store.

``Forecaster`` is the public face (``bdlens.Forecaster`` too); see docs/ensemble.md.
"""

from bdlens.ensemble.base import Forecast, MemberSource, Wrapped
from bdlens.ensemble.design import Design
from bdlens.ensemble.engine import Forecaster

__all__ = ["Design", "Forecast", "Forecaster", "MemberSource", "Wrapped"]
