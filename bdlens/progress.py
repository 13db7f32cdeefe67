"""Progress bars (tqdm) that the CLI's ``-q`` switches off in one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every bdlens progress bar on or off (the CLI's -q)."""
    global _enabled
    _enabled = enabled


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled under -q; keyword arguments go to tqdm (``total``, ``desc``, ``unit``)."""
    kwargs.setdefault("disable", not _enabled)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
