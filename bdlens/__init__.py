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

#: Public names imported on first use, so that `import bdlens` stays light (no xarray, matplotlib or torch).
_LAZY = {"Forecaster": "bdlens.ensemble", "uncertainty_maps": "bdlens.report.maps"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bdlens' has no attribute {name!r}")
