"""What a command may write, replace or resume: the one place that decides (nothing the user has is lost).

Every output directory that bdlens creates (a run directory, a world, a forecast store, a report)
carries a marker file, ``.bdlens-output.json``, with the kind of output and the bdlens version that
wrote it. :func:`prepare_output` is called by every command before its long computation:

* an output path that is one of the command's inputs, lies inside one or holds one is refused,
  whatever the flags (``--overwrite`` must never delete what the command reads);
* a missing or empty directory is fine (it is created at the first write);
* an existing output is resumed with ``resume`` only if its marker says it is of the same kind;
* it is replaced with ``overwrite`` only if its marker says bdlens wrote it (same kind), otherwise
  the command stops with a one-line error and the directory is left untouched;
* anything else (a file, a foreign directory, an output without ``--overwrite``/``--resume``) is an
  error that says what to do.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bdlens import __version__
from bdlens.errors import BdlensError

MARKER = ".bdlens-output.json"


def mark_output(path: str | Path, kind: str, **extra: Any) -> Path:
    """Create directory ``path`` (if needed) and record that bdlens wrote it as an output of ``kind``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"kind": kind, "bdlens_version": __version__, **extra}))
    return path


def output_kind(path: str | Path) -> str | None:
    """The kind recorded in ``path``'s marker, or None when bdlens did not mark it."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("kind"))
    except (json.JSONDecodeError, AttributeError):
        return None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def prepare_output(
    path: str | Path,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    dry_run: bool = False,
) -> bool:
    """Check (and with ``overwrite`` clear) the output directory ``path`` before any work starts.

    Returns True when an existing output of ``kind`` is to be resumed, False for a fresh start.
    Raises :class:`BdlensError` (one line, what to do) in the cases of the module docstring; nothing
    is changed on disk unless ``overwrite`` replaces an output that bdlens marked as its own.
    ``dry_run`` checks only: a command that builds its output elsewhere and moves it into place at
    the end calls it first with ``dry_run`` (fail early) and again just before the move (replace).
    """
    path = Path(path)
    if resume and overwrite:
        raise BdlensError("--resume and --overwrite exclude each other; pick one")
    resolved = path.resolve()
    for given in inputs:
        if given is not None and _overlaps(resolved, Path(given).resolve()):
            raise BdlensError(f"{flag} {path} is also an input of this command ({given}); choose another output path")
    if path.exists() and not path.is_dir():
        raise BdlensError(f"{flag} {path} is a file, not a directory; choose another path")
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise BdlensError(f"nothing to resume in {path}; start without --resume")
        return False
    found = output_kind(path)
    if resume:
        if found != kind:
            raise BdlensError(f"{path} is not a bdlens {kind} output, so it cannot be resumed; choose another {flag}")
        return True
    if not overwrite:
        raise BdlensError(f"{path} already exists; pass --resume to continue it, --overwrite to replace it, or choose another {flag}")
    if found != kind:
        what = "was not written by bdlens" if found is None else f"holds a bdlens {found} output, not a {kind}"
        raise BdlensError(f"{path} {what}; --overwrite only replaces a bdlens {kind}, so move it away or choose another {flag}")
    if not dry_run:
        shutil.rmtree(path)
    return False
