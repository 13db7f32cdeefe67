"""Uncertainty maps, plot helpers and the HTML evaluation report (reads xarray only).

* :func:`bdlens.report.maps.uncertainty_maps` (also ``bdlens.uncertainty_maps``) — ensemble mean,
  total / epistemic / aleatoric standard deviation, epistemic fraction, exceedance probabilities.
* :mod:`bdlens.report.maps` and :mod:`bdlens.report.figures` — matplotlib figures, ``savefig``-ready.
* :func:`bdlens.report.html.write_report` — the self-contained HTML report behind ``bdlens report``.
"""
