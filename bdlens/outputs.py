"""What a command may write, replace or resume: the one place that decides (nothing the user has is lost).

Every output directory that bdlens creates (a run directory, a world, a forecast store, a report)
carries a marker file, ``.bdlens-output.json``, with the kind of output and the bdlens version that
wrote it. :func:`prepare_output` is called by every command before its long computation:

* an output path that is one of the command's inputs, lies inside one or holds one is refused,
  whatever the flags (``--overwrite`` must never delete what the command reads);
* a missing or empty directory is fine (it is created at the first write);
* an existing output is resumed with ``resume`` only if it is bdlens's and of the same kind;
* it is replaced with ``overwrite`` only if it is bdlens's, of the same kind, and holds nothing
  else (a file the user added, e.g. notes or a calibration, stops the replacement and is named);
* anything else (a file, a foreign directory, an output without ``--overwrite``/``--resume``) is an
  error that says what to do.

"bdlens's" means marked, or (for outputs written before the marker existed, and for the bundled
checkpoints, which ship without one) laid out exactly as bdlens lays that kind out: every file
matches the caller's ``layout`` patterns and the ``required`` files are there. A directory with
anything else in it is never taken for bdlens's.

File outputs (``bdlens evaluate --out metrics.nc``) cannot carry a marker; :func:`check_output_file`
asks the caller whether an existing file is bdlens's (e.g. by its attributes or header).

Partial outputs are named ``.<name>.partial-<pid>`` beside the target (:func:`partial_path`): the
next run on the same target removes those whose process has died (a SIGKILLed run), so none stays.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bdlens import __version__
from bdlens.errors import BdlensError

MARKER = ".bdlens-output.json"
_PARTIAL = ".partial-"


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


#: Every file of a zarr v2 store (group and array metadata, chunk keys, which start with a digit), so
#: that ``--overwrite`` of a store finds the files a user put into it. ``*`` also crosses ``/``.
ZARR_LAYOUT = (".zgroup", ".zattrs", ".zmetadata", "*/.zgroup", "*/.zattrs", "*/.zarray", "*/[0-9]*")


def foreign_files(path: Path, layout: Sequence[str]) -> list[str]:
    """Files under ``path`` (relative POSIX paths) that match none of the ``layout`` glob patterns
    (``*`` also crosses ``/``, so ``truth.zarr/*`` covers a whole store). The marker is bdlens's."""
    files = (p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if not p.is_dir())
    return [f for f in files if f != MARKER and not any(fnmatch.fnmatchcase(f, pattern) for pattern in layout)]


def _recognised(path: Path, kind: str, layout: Sequence[str], required: Sequence[str]) -> tuple[str | None, list[str]]:
    """(kind found, files that bdlens did not write) of the existing directory ``path``."""
    found = output_kind(path)
    foreign = foreign_files(path, layout) if layout else []
    if found is None and layout and not foreign and all((path / name).exists() for name in required):
        found = kind  # written before the marker existed (or a bundled checkpoint): its layout says whose it is
    return found, foreign


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_inputs(path: Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    """Refuse an output ``path`` that is, holds or lies inside one of the command's ``inputs``."""
    resolved = path.resolve()
    for given in inputs:
        if given is not None and _overlaps(resolved, Path(given).resolve()):
            raise BdlensError(f"{flag} {path} is also an input of this command ({given}); choose another output path")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def prepare_output(
    path: str | Path,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    layout: Sequence[str] = (),
    required: Sequence[str] = (),
    clear: bool = True,
    dry_run: bool = False,
    resumable: bool = False,
) -> bool:
    """Check (and with ``overwrite`` clear) the output directory ``path`` before any work starts.

    Returns True when an existing output of ``kind`` is to be resumed, False for a fresh start.
    ``layout``: glob patterns of every file bdlens writes in such an output (relative to it; empty
    for opaque outputs such as zarr stores), used to find files the user added and to recognise
    unmarked outputs with the ``required`` files. ``clear=False`` leaves an output that
    ``overwrite`` may replace in place, for a caller that swaps the new one in when it is complete
    (:func:`replace_with`). Raises :class:`BdlensError` (one line, what to do) in the cases of the
    module docstring; nothing is changed on disk unless ``overwrite`` replaces bdlens's own output.
    ``dry_run`` checks only: a command that builds its output elsewhere and moves it into place at
    the end calls it first with ``dry_run`` (fail early) and again just before the move (replace).
    ``resumable``: the command has ``--resume``, so the refusal of an existing output offers it.
    """
    path = Path(path)
    if resume and overwrite:
        raise BdlensError("--resume and --overwrite exclude each other; pick one")
    check_inputs(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise BdlensError(f"{flag} {path} is a file, not a directory; choose another path")
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise BdlensError(f"nothing to resume in {path}; start without --resume")
        return False
    found, foreign = _recognised(path, kind, layout, required)
    if resume:
        if found != kind:
            raise BdlensError(f"{path} is not a bdlens {kind} output, so it cannot be resumed; choose another {flag}")
        return True
    if not overwrite:
        offer = "pass --resume to continue it, --overwrite" if resumable else "pass --overwrite"
        raise BdlensError(f"{path} already exists; {offer} to replace it, or choose another {flag}")
    if found != kind:
        what = f"holds a bdlens {found} output, not a {kind}" if found else "was not written by bdlens"
        what += f" (it holds {_shown(foreign)})" if foreign else ""
        raise BdlensError(f"{path} {what}; --overwrite only replaces a bdlens {kind}, so move it away or choose another {flag}")
    if foreign:
        raise BdlensError(f"{path} holds files bdlens did not write ({_shown(foreign)}); move them away to replace it with --overwrite")
    if clear and not dry_run:
        shutil.rmtree(path)
    return False


def check_output_file(
    path: str | Path,
    overwrite: bool,
    is_own: Callable[[Path], bool],
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    what: str = "output",
) -> None:
    """Refuse a file output ``path`` that is an input, a directory, in a missing folder, or an existing
    file that needs ``overwrite`` or that ``is_own`` does not recognise as a bdlens ``what``."""
    path = Path(path)
    check_inputs(path, inputs, flag)
    if path.is_dir():
        raise BdlensError(f"{flag} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise BdlensError(f"{flag}: folder {path.parent} does not exist; create it first")
    if path.exists():
        if not overwrite:
            raise BdlensError(f"{flag} {path} exists; pass --overwrite to replace it or choose another path")
        if not is_own(path):
            raise BdlensError(f"{flag} {path} is not a bdlens {what}; --overwrite only replaces one, so move it away or choose another path")


def partial_path(target: str | Path) -> Path:
    """Where to build ``target`` before renaming it into place: ``.<name>.partial-<pid>`` beside it.

    Partials of ``target`` left by processes that no longer run (killed) are removed first, so a
    SIGKILL leaves nothing for good; a partial of a live process (a concurrent run) is left alone.
    """
    target = Path(target)
    prefix = f".{target.name}{_PARTIAL}"
    if target.parent.is_dir():
        for stale in target.parent.glob(prefix + "*"):
            pid = stale.name[len(prefix):].split(".")[0]  # also ".<name>.partial-<pid>.old" (see replace_with)
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return target.with_name(f"{prefix}{os.getpid()}")


def replace_with(partial: Path, target: Path) -> None:
    """Move the finished ``partial`` (from :func:`partial_path`) to ``target``, replacing what is there.

    The old ``target`` is first renamed aside (a partial name, cleaned by the next run if we are
    killed here) and deleted only after the swap, so ``target`` is at all times whole, old or new.
    """
    if target.exists():
        old = partial.with_name(partial.name + ".old")
        target.rename(old)
        partial.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        partial.rename(target)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
