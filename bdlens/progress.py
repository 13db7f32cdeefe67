"""Progress bars (tqdm) on a terminal, plain periodic log lines otherwise; the CLI's ``-q`` switches both off."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("bdlens.progress")

#: Seconds between two progress lines when stderr is not a terminal (a log file, a batch job).
LOG_INTERVAL = 60.0

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every bdlens progress bar on or off (the CLI's -q)."""
    global _enabled
    _enabled = enabled


class _LogLines:
    """A file for tqdm that turns each refresh into one INFO log line (no carriage returns, no bar)."""

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                log.info(line.strip())

    def flush(self) -> None:
        pass


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled under -q; keyword arguments go to tqdm (``total``, ``desc``, ``unit``).

    On a terminal it redraws in place; elsewhere (stderr redirected to a file or a pipe) it logs a
    plain line at most every :data:`LOG_INTERVAL` seconds and at the end.
    """
    kwargs.setdefault("disable", not _enabled)
    if sys.stderr.isatty():
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("file", _LogLines())
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    return tqdm(iterable, **kwargs)
