"""The one exception type that the CLI turns into a clear one-line message and a non-zero exit."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class BdlensError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""


def validation_error(source: str, err: ValidationError) -> BdlensError:
    """A :class:`BdlensError` listing every problem of a pydantic ``ValidationError`` on one line.

    Each problem reads ``field.path: message``; ``source`` (a file or "model config") leads the line.
    """
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors()
    )
    return BdlensError(f"{source}: {problems}")
