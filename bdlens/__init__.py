"""bdlens: probabilistic ensemble weather forecasting with Bayesian deep learning.

Architecture (one sub-package per stage): ``world`` (demo world and physics ensemble) → ``data``
(readers, normalisation, torch datasets) → ``models`` (3D Earth-Specific Transformer) → ``bayes``
(variational posterior) → ``perturbation`` (aleatoric schemes) → ``ensemble`` → ``metrics`` /
``uncertainty`` → ``report``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bdlens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Forecaster", "__version__"]


def __getattr__(name: str):  # lazy: `import bdlens` stays light (no torch) until the API is used
    if name == "Forecaster":
        from bdlens.ensemble import Forecaster

        return Forecaster
    raise AttributeError(f"module 'bdlens' has no attribute {name!r}")
